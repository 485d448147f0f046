"""One rank of the gloo parity job that tests/test_parallel.py starts: `python -m tests.parallel_worker OUT`.

Every case builds its plan's process groups over the whole world (a 2-way plan runs as 2 independent
replicas inside the 4-process job, so one job with one interpreter start per rank covers every case),
rewrites a fresh copy of the tiny model, runs a short denoising loop (or the T5 encoder), and rank 0
of each replica saves the result as OUT/<case>.<replica>.pt. The test computes the single-process
reference with the same functions (`denoise`, `encode_text`) and compares.

Parity alone cannot tell a split from no split (a rank that computes the whole model also matches the
single process), so every rank also saves OUT/<case>.<replica>.r<rank in replica>.json: the evidence of
its share of the work (sharded weight shapes, the tokens and heads its first self-attention saw, the
batch and prompt rows of its CFG half), which the test checks against the plan.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import torch

import wanrt.models.dit as dit_module
import wanrt.parallel.ulysses as ulysses_module
from wanrt.models.config import WanConfig
from wanrt.models.tiny import random_models
from wanrt.parallel import ParallelPlan, build_groups, session
from wanrt.parallel.pipeline import dit_backend
from wanrt.parallel.tp import apply_tp_t5
from wanrt.runtime.backends import EagerDiT
from wanrt.runtime.step import CFGStep
from wanrt.schedulers import make_scheduler

# Latent grids (T, h, w); tokens = T * h/2 * w/2 with the (1, 2, 2) patch.
GRID_PAD = (3, 10, 6)  # 45 tokens: padded to 46 for U=2 and to 48 for U=4 (3 padded keys on the last rank)
GRID_EVEN = (2, 8, 8)  # 32 tokens: no padding
GRID_SHORT = (5, 2, 2)  # 5 tokens over U=4: chunks of 2, the last rank holds only padding

CASES: dict[str, tuple[ParallelPlan, tuple[int, int, int] | None]] = {
    "cfg2": (ParallelPlan(cfg=True), GRID_PAD),
    "u2": (ParallelPlan(ulysses=2), GRID_PAD),
    "u2_even": (ParallelPlan(ulysses=2), GRID_EVEN),
    "u4": (ParallelPlan(ulysses=4), GRID_PAD),
    "u4_short": (ParallelPlan(ulysses=4), GRID_SHORT),
    "u2_cfg2": (ParallelPlan(ulysses=2, cfg=True), GRID_PAD),
    "tp2": (ParallelPlan(tp=2), GRID_PAD),
    "tp4": (ParallelPlan(tp=4), GRID_PAD),
    "t5_tp2": (ParallelPlan(tp=2), None),
    "t5_tp4": (ParallelPlan(tp=4), None),
}
STEPS = 3


@functools.cache
def models():
    """The tiny DiT and T5 with deterministic random weights (fp32, CPU). Callers must not modify them."""
    _, dit, _, t5, _ = random_models(WanConfig.tiny(), seed=0)
    return dit, t5


def make_inputs(grid: tuple[int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A request's tensors at latent grid (T, h, w): noise, both prompts' context, CLIP tokens, y."""
    cfg = WanConfig.tiny().dit
    t, h, w = grid
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    context[0, 7:] = 0  # zero rows after each prompt, as the text encoder returns them
    context[1, 11:] = 0
    return {
        "latent": torch.randn(1, 16, t, h, w, generator=g),
        "context": context,
        "clip_fea": torch.randn(1, 2 * cfg.clip_tokens, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, t, h, w, generator=g),
    }


@torch.no_grad()
def denoise(dit, inputs: dict[str, torch.Tensor], steps: int = STEPS) -> torch.Tensor:
    """The pipeline's sampling loop (UniPC, shift 16, guide 5) with DiT backend `dit`."""
    scheduler = make_scheduler("unipc", 16.0)
    scheduler.set_timesteps(steps, device="cpu")
    step = CFGStep(dit, inputs["context"], inputs["clip_fea"], inputs["y"], 5.0, scheduler, inputs["latent"])
    return step.run(cuda_graph=False).clone()


def t5_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    cfg = WanConfig.tiny().t5
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (2, cfg.text_len), generator=g)
    mask = torch.zeros_like(ids)
    mask[0, :9], mask[1, :23] = 1, 1
    return ids * mask, mask


@torch.no_grad()
def encode_text(t5) -> torch.Tensor:
    return t5(*t5_inputs())


class _Evidence:
    """Records what one rank computed: the attention function the models call is wrapped once (the first
    call of a denoising run is block 0's self-attention of step 0) and block 0 of the DiT is hooked."""

    current: _Evidence | None = None

    def __init__(self):
        self.data: dict = {}
        _Evidence.current = self

    @staticmethod
    def install() -> None:
        for module in (dit_module, ulysses_module):
            def recording(q, k, v, *args, _inner=module.attention, **kw):
                data = _Evidence.current.data
                if "attn_q" not in data:  # (B, tokens, heads, head_dim) and the number of keys
                    data["attn_q"], data["attn_keys"] = list(q.shape), k.shape[1]
                return _inner(q, k, v, *args, **kw)

            module.attention = recording

    def watch_dit(self, model) -> None:
        block = model.blocks[0]
        self.data["q_weight"] = list(block.self_attn.q.weight.shape)
        self.data["ffn_up"] = list(block.ffn[0].weight.shape)
        self.data["ffn_down"] = list(block.ffn[2].weight.shape)
        self.data["heads"] = block.self_attn.num_heads

        def block_in(module, args):
            self.data.setdefault("block_in", list(args[0].shape))  # (B, local tokens, dim)
            # the text rows of the embedded context, one fingerprint per batch row (cond / uncond)
            self.data.setdefault("context_rows", [float(r.abs().sum()) for r in args[2][:, -512:]])

        block.register_forward_pre_hook(block_in)

    def watch_t5(self, encoder) -> None:
        m = encoder.model
        attn = m.encoder.block[0].layer[0].SelfAttention
        self.data["t5_q_weight"] = list(attn.q.weight.shape)
        self.data["t5_heads"] = attn.n_heads
        self.data["t5_embedding"] = list(m.encoder.embed_tokens.weight.shape)
        self.data["t5_ffn_out"] = list(m.encoder.block[0].layer[1].DenseReluDense.wo.weight.shape)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dit, t5 = models()
    _Evidence.install()
    with session("cpu") as run:
        for name, (plan, grid) in CASES.items():
            groups = build_groups(plan)
            evidence = _Evidence()
            if grid is None:
                encoder = apply_tp_t5(copy.deepcopy(t5), groups.tp)
                evidence.watch_t5(encoder)
                result = encode_text(encoder)
            else:
                backend = dit_backend(copy.deepcopy(dit), groups)
                evidence.watch_dit(backend.model)
                result = denoise(backend, make_inputs(grid))
            evidence.data["cfg_rank"] = None if groups.cfg is None else groups.cfg.rank
            (out / f"{name}.{groups.replica}.r{run.rank % plan.size}.json").write_text(json.dumps(evidence.data))
            if groups.is_replica_main:
                torch.save(result, out / f"{name}.{groups.replica}.pt")
            if run.is_main:
                print(f"{name} done", flush=True)


def reference(name: str) -> torch.Tensor:
    """The single-process result of a case."""
    dit, t5 = models()
    grid = CASES[name][1]
    return encode_text(t5) if grid is None else denoise(EagerDiT(dit), make_inputs(grid))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
