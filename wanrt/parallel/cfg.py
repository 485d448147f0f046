"""CFG parallelism: the cond half of the batch-2 DiT call on rank 0 of a pair, the uncond half on rank 1.

The sampler (wanrt/runtime/step.py) calls the DiT once per step with batch 2 = [cond, uncond]; this
wrapper keeps that contract. Each rank runs its own half (batch 1) and one all-gather per step
exchanges the two noise predictions, so both ranks hold the same (2, ...) prediction and step the
scheduler identically. The inner DiT may itself be sequence-parallel (U x CFG).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .plan import Axis


class CFGParallelDiT:
    """A DiT backend over a CFG pair: same call signature and result as the wrapped batch-2 backend."""

    def __init__(self, dit, axis: Axis):
        if axis.size != 2:
            raise ValueError(f"a CFG pair has 2 ranks, got {axis.size}")
        self.dit = dit
        self.axis = axis

    @property
    def model(self):
        return self.dit.model

    def time_embeddings(self, timesteps: torch.Tensor):
        """The wrapped DiT's (a step cache's decisions are the same on both ranks: they depend only on these)."""
        return self.dit.time_embeddings(timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        """Inputs batch 2 ([cond, uncond]) -> prediction (2, 16, F, H, W), identical on both ranks."""
        if x.shape[0] != 2:  # guidance 1.0 runs the cond branch alone: nothing to split across the pair
            raise ValueError("CFG parallel needs the batch-2 CFG step; guidance 1.0 has no uncond branch "
                             "(run it without --cfg_parallel)")
        i = slice(self.axis.rank, self.axis.rank + 1)
        pred = self.dit(x[i], t[i], context[i], clip_fea[i], y[i]).contiguous()  # (1, 16, F, H, W)
        parts = [torch.empty_like(pred) for _ in range(2)]
        dist.all_gather(parts, pred, group=self.axis.group)  # the one exchange per step
        return torch.cat(parts)
