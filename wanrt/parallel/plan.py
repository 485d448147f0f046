"""What runs where: a `ParallelPlan` (ulysses x cfg, or tp), its checks, and the process groups it needs.

Rank layout of one replica of a plan (ranks base .. base + size - 1):
- U x CFG: local rank = cfg_rank * U + ulysses_rank, so a Ulysses group is U consecutive ranks (the
  all-to-all traffic stays inside a node / an NVLink island) and a CFG pair is {u, U + u};
- TP: the T consecutive ranks.
The CLI requires world size == plan size; `build_groups` also accepts a multiple (independent
replicas of the plan), which the tests use to run 2-way cases inside a 4-process job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist


class PlanError(ValueError):
    """An impossible parallel configuration; the message says which flag and how to fix it."""


@dataclass(frozen=True)
class ParallelPlan:
    ulysses: int = 1  # sequence-parallel degree of the DiT (heads scattered in self-attention)
    cfg: bool = False  # cond and uncond halves of the CFG batch on different ranks
    tp: int = 1  # tensor-parallel degree (DiT and T5); runs alone

    @property
    def size(self) -> int:
        """Processes one replica of the plan uses."""
        return self.tp * self.ulysses * (2 if self.cfg else 1)

    def describe(self) -> str:
        parts = ([f"ulysses{self.ulysses}"] if self.ulysses > 1 else []) + (["cfg2"] if self.cfg else []) + (
            [f"tp{self.tp}"] if self.tp > 1 else [])
        return "+".join(parts) or "single"

    def check(self, world_size: int | None = None, config=None) -> None:
        """Raise PlanError unless the plan is possible for `world_size` processes and `config` (a WanConfig)."""
        if self.ulysses < 1 or self.tp < 1:
            raise PlanError(f"--ulysses_size and --tp_size must be >= 1, got {self.ulysses} and {self.tp}")
        if self.tp > 1 and (self.ulysses > 1 or self.cfg):
            raise PlanError("--tp_size cannot be combined with --ulysses_size or --cfg_parallel "
                            "(tensor parallel runs alone; use ulysses x cfg for sequence parallelism)")
        if config is not None:
            d = config.dit
            if d.num_heads % self.ulysses:
                raise PlanError(f"--ulysses_size {self.ulysses}: the DiT's {d.num_heads} heads are not divisible by "
                                f"{self.ulysses}; use one of {_divisors(d.num_heads)}")
            if self.tp > 1:
                t5 = config.t5
                sizes = {"DiT heads": d.num_heads, "DiT ffn_dim": d.ffn_dim, "T5 heads": t5.num_heads,
                         "T5 dim_ffn": t5.dim_ffn}
                for what, n in sizes.items():
                    if n % self.tp:
                        ok = _divisors(math.gcd(*sizes.values()))
                        raise PlanError(f"--tp_size {self.tp}: {what} = {n} is not divisible by {self.tp}; "
                                        f"use one of {ok}")
        if world_size is not None and world_size != self.size:
            if self.size == 1:
                raise PlanError(f"{world_size} processes but no split was asked for: add --ulysses_size and/or "
                                "--cfg_parallel (ulysses_size x 2 = processes), or --tp_size (= processes)")
            if world_size == 1:
                raise PlanError(f"{self._formula()}, but this is a single process: add --nproc {self.size} or "
                                f"launch with torchrun --nproc_per_node={self.size} -m wanrt generate ...")
            raise PlanError(f"{world_size} processes, but {self._formula()}: the world size must equal "
                            "ulysses_size x (2 with --cfg_parallel), or tp_size")

    def _formula(self) -> str:
        if self.tp > 1:
            return f"--tp_size {self.tp} = {self.tp} processes"
        cfg = " x 2 (--cfg_parallel)" if self.cfg else ""
        return f"--ulysses_size {self.ulysses}{cfg} = {self.size} processes"


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


@dataclass(frozen=True)
class Axis:
    """One parallel dimension as seen by this rank."""

    group: dist.ProcessGroup
    rank: int
    size: int


@dataclass(frozen=True)
class ParallelGroups:
    plan: ParallelPlan
    replica: int
    ulysses: Axis | None = None
    cfg: Axis | None = None
    tp: Axis | None = None

    @property
    def is_replica_main(self) -> bool:
        """Rank 0 of this replica of the plan (the one that reports its result)."""
        return all(a is None or a.rank == 0 for a in (self.ulysses, self.cfg, self.tp))


def build_groups(plan: ParallelPlan, world_size: int | None = None, rank: int | None = None) -> ParallelGroups:
    """Create the plan's process groups (a collective call: every rank of the world must call it, in the
    same order) and return this rank's axes."""
    world = dist.get_world_size() if world_size is None else world_size
    me = dist.get_rank() if rank is None else rank
    if world % plan.size:
        raise PlanError(f"world size {world} is not a multiple of the plan's {plan.size} processes")
    mine: dict[str, Axis] = {}

    def add(name: str, ranks: list[int]) -> None:
        # new_group is collective over the whole world even for ranks outside `ranks`
        group = dist.new_group(ranks)
        if me in ranks:
            mine[name] = Axis(group, ranks.index(me), len(ranks))

    u, c = plan.ulysses, 2 if plan.cfg else 1
    for base in range(0, world, plan.size):
        if plan.tp > 1:
            add("tp", list(range(base, base + plan.tp)))
        if u > 1:
            for ci in range(c):
                add("ulysses", [base + ci * u + ui for ui in range(u)])
        if c > 1:
            for ui in range(u):
                add("cfg", [base + ci * u + ui for ci in range(c)])
    return ParallelGroups(plan=plan, replica=me // plan.size, **mine)
