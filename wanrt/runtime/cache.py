"""Step caching (TeaCache-style): skip the DiT call of a denoising step whose output is predictable.

The rule (TeaCache, Liu et al. 2024; the authors' Wan2.1 code is TeaCache4Wan2.1/teacache_generate.py in
github.com/ali-vilab/TeaCache): at every step i measure how much the DiT's timestep-modulation input changed
since step i - 1,

    d_i = mean|m_i - m_{i-1}| / mean|m_{i-1}|          m = the time embedding e (or e0) of step i's timestep

rescale it with a polynomial fitted from input change to output change, and accumulate it over the
steps since the last computed one. While the sum stays under the threshold the step reuses the cached
prediction; when it reaches the threshold the step is computed and the sum restarts at 0. The first
`first_steps` and the last `last_steps` steps are always computed.

Why the whole decision is made once per request, before the loop: for Wan the authors' indicator is
the timestep embedding (`e`, or `e0` with their `use_ret_steps`), not a function of the latent; every
request's `m_i` is therefore fixed by the schedule's timesteps, and so is every decision. Computing it
up front (`teacache_plan`) keeps the step free of host logic (one CUDA graph for a computed step, one
for a cached step), needs no split of engine graphs (engines ship the time-embedding table, see
wanrt/export `dit_time`), and makes every rank of a multi-GPU run take the same decisions by construction.
Cond and uncond share the timestep, so their decisions coincide (the authors keep two counters that
always agree); their cached predictions stay separate (one row per branch of the batch).

What is reused: the authors add the cached residual of the transformer blocks (token space, before the
head) to the new step's patch embedding. Our engines run the DiT as one graph, so we cache at the DiT's
output instead, per branch, and measured on the trained tiny model which of two velocity-space rules is
closer to the uncached video (scripts/cache_tradeoff.py, README "Step caching"):
  - "velocity": reuse the last computed velocity v_j as is;
  - "residual": reuse the DiT's output minus its input, v_k = x_k + (v_j - x_j).
REUSE names the one the pipeline uses: "velocity", the higher mean PSNR at 0.002-0.01 on the shipped tiny
model ("residual" at 0.02 by 0.2 dB, at 0.05, 0.1 and 0.2 by 1.1, 0.7 and 2.7 dB; the model before it: the same
ranking; an earlier one: "velocity" also at 0.1, and one before up to 0.02).
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("none", "teacache")
REUSE = "velocity"  # measured against "residual" on the tiny model's held-out clips (see module doc)


class CacheError(ValueError):
    """A step-cache request that cannot be served; the message says why and what to do."""


def check(method: str, threshold: float | None) -> None:
    """Refuse an unknown method or a bad threshold before any work."""
    if method not in METHODS:
        raise CacheError(f"unknown cache method {method!r}; choose one of {', '.join(METHODS)}")
    if threshold is not None:
        if method == "none":
            raise CacheError("cache_threshold needs a cache method (e.g. cache='teacache')")
        if not threshold >= 0:  # also refuses NaN
            raise CacheError(f"cache_threshold must be >= 0, got {threshold}")


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| in float64 (b: the previous step's value)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().mean() / b.abs().mean())


def teacache_plan(indicator: torch.Tensor, coefficients, threshold: float, first_steps: int = 1,
                  last_steps: int = 1) -> list[bool]:
    """indicator (n, ...): the modulation input of each step (one row per step, any branch: they share
    the timestep). Returns n booleans, True = call the DiT, False = reuse the cache."""
    n = indicator.shape[0]
    compute, acc = [], 0.0
    for i in range(n):
        if i < first_steps or i >= n - last_steps or i == 0:
            call = True
        else:
            acc += float(np.polyval(coefficients, rel_l1(indicator[i], indicator[i - 1])))
            call = acc >= threshold
        if call:
            acc = 0.0
        compute.append(call)
    return compute


def require(dit, teacache) -> None:
    """Raise CacheError unless TeaCache can run: coefficients exist for the model (`teacache`, its
    TeaCacheConfig or None) and the DiT backend gives its time embeddings."""
    if teacache is None:
        raise CacheError("no TeaCache coefficients exist for this model's DiT architecture; fit them with "
                         "scripts/fit_teacache.py, or use cache='none'")
    if getattr(dit, "time_embeddings", None) is None:
        raise CacheError(f"the DiT backend {type(dit).__name__} cannot give its time embeddings; use cache='none'")
    if getattr(dit, "time_table", True) is None:  # an engine dir made before the dit_time table existed
        raise CacheError(missing_table(getattr(dit, "root", None)))


def missing_table(root) -> str:
    return (f"{root} has no DiT time-embedding table (dit_time), which step caching needs; re-run "
            "`wanrt export`/`wanrt build` for it, or use cache='none'")


def plan_for(dit, teacache, timesteps: torch.Tensor, threshold: float | None = None) -> list[bool]:
    """The request's decisions for DiT backend `dit` (anything with `time_embeddings(timesteps)`) and
    the model's TeaCacheConfig `teacache`; threshold None: the config's default."""
    require(dit, teacache)
    e, e0 = dit.time_embeddings(timesteps)
    indicator = e if teacache.indicator == "e" else e0
    thr = teacache.threshold if threshold is None else float(threshold)
    return teacache_plan(indicator.float().cpu(), teacache.coefficients, thr, teacache.first_steps,
                         teacache.last_steps)


class StepCache:
    """The per-request cache of the step: the last computed prediction of every branch (row of the
    batch), plus the DiT input it came from for the "residual" rule. Static buffers, so both the
    computed and the cached step can be captured as CUDA graphs."""

    def __init__(self, plan: list[bool], x: torch.Tensor, reuse: str | None = None):
        reuse = REUSE if reuse is None else reuse
        if reuse not in ("velocity", "residual"):
            raise ValueError(f"reuse must be 'velocity' or 'residual', got {reuse!r}")
        if plan and not plan[0]:
            raise ValueError("the first step must be computed (nothing is cached yet)")
        self.plan = list(plan)
        self.reuse = reuse
        self.pred = torch.zeros_like(x)  # (branches, 16, T, h, w): row b is branch b's own cache
        residual = reuse == "residual"
        self.x = torch.zeros_like(x) if residual else None  # the input the cached prediction came from
        self.out = torch.zeros_like(x) if residual else None  # what a cached step returns

    @property
    def dit_calls(self) -> int:
        return sum(self.plan)

    def store(self, x: torch.Tensor, pred: torch.Tensor) -> None:
        """After a computed step: remember every branch's prediction (and its input)."""
        self.pred.copy_(pred)
        if self.x is not None:
            self.x.copy_(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """A cached step's prediction for input x, branch by branch from that branch's own cache."""
        if self.x is None:
            return self.pred
        torch.sub(x, self.x, out=self.out)
        return self.out.add_(self.pred)
