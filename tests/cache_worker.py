"""One rank of the gloo step-caching job of tests/test_cache.py: `python -m tests.cache_worker OUT`.

Two processes; each case (a CFG pair, a 2-way Ulysses split) rewrites a fresh copy of the tiny random
DiT, computes its TeaCache plan from its own DiT backend, runs the cached denoising loop, and every rank
saves {plan, latent, dit_calls} as OUT/<case>.<rank>.pt (every rank, not only rank 0: the test checks
that they agree).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from tests.parallel_worker import GRID_PAD, make_inputs, models
from wanrt.models.config import TeaCacheConfig
from wanrt.parallel import ParallelPlan, build_groups, session
from wanrt.parallel.pipeline import dit_backend
from wanrt.runtime.cache import plan_for
from wanrt.runtime.step import CFGStep
from wanrt.schedulers import make_scheduler

CASES = {"cfg2": ParallelPlan(cfg=True), "u2": ParallelPlan(ulysses=2)}
STEPS = 12
# The random tiny DiT has no fitted coefficients: the identity rescaling (raw rel-L1) with a threshold
# that skips some of the 12 steps and computes others (measured: 5 calls).
TEACACHE = TeaCacheConfig(coefficients=(1.0, 0.0), indicator="e", first_steps=1, last_steps=1, threshold=2.0)


@torch.no_grad()
def cached_denoise(dit, inputs: dict[str, torch.Tensor]) -> dict:
    scheduler = make_scheduler("unipc", 16.0)
    scheduler.set_timesteps(STEPS, device="cpu")
    plan = plan_for(dit, TEACACHE, scheduler.timesteps)
    step = CFGStep(dit, inputs["context"], inputs["clip_fea"], inputs["y"], 5.0, scheduler, inputs["latent"],
                   cache_plan=plan)
    latent = step.run(cuda_graph=False).clone()
    return {"plan": plan, "latent": latent, "dit_calls": step.dit_calls}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dit, _ = models()
    with session("cpu") as run:
        for name, plan in CASES.items():
            groups = build_groups(plan)
            result = cached_denoise(dit_backend(copy.deepcopy(dit), groups), make_inputs(GRID_PAD))
            torch.save(result, out / f"{name}.{run.rank}.pt")


def reference() -> dict:
    from wanrt.runtime.backends import EagerDiT

    dit, _ = models()
    return cached_denoise(EagerDiT(dit), make_inputs(GRID_PAD))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
