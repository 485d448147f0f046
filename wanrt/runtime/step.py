"""The denoising step: DiT batch-2 CFG call + guidance + scheduler update, on static buffers.

Everything that depends only on the request (context of both prompts, CLIP tokens, the conditioning
latent y) is placed into fixed batch-2 buffers once; each step copies the latent and the timestep in,
calls the DiT backend once, combines `uncond + g * (cond - uncond)` and updates the latent in place
with the scheduler's precomputed coefficients. No per-step shape logic, no new buffers of our own.
"""

from __future__ import annotations

import torch


class CFGStep:
    """step(k) advances `self.latent` (1, 16, T, h, w) fp32 from sigma_k to sigma_{k+1} in place."""

    def __init__(self, dit, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor, guide_scale: float,
                 scheduler, latent: torch.Tensor):
        device = latent.device
        self.dit = dit
        self.guide_scale = float(guide_scale)
        self.latent = latent.to(torch.float32).contiguous().clone()
        self.x = torch.empty((2, *self.latent.shape[1:]), dtype=torch.float32, device=device)
        self.t = torch.empty(2, dtype=torch.int64, device=device)
        self.context = context.contiguous()  # (2, 512, text_dim): cond, uncond
        self.clip_fea = clip_fea.expand(2, *clip_fea.shape[1:]).contiguous()
        self.y = y.expand(2, *y.shape[1:]).contiguous()
        self.guided = torch.empty_like(self.latent)
        self.timesteps = scheduler.timesteps.to(device)
        self.scheduler = scheduler
        self.state = scheduler.init_state(self.latent)

    def __call__(self, k: int) -> torch.Tensor:
        self.x.copy_(self.latent.expand_as(self.x))
        self.t.copy_(self.timesteps[k].expand(2))
        pred = self.dit(self.x, self.t, self.context, self.clip_fea, self.y)  # (2, 16, T, h, w)
        # uncond + g * (cond - uncond), written into a static buffer
        torch.sub(pred[0:1], pred[1:2], out=self.guided)
        self.guided.mul_(self.guide_scale).add_(pred[1:2])
        return self.scheduler.step_with_state(k, self.guided, self.latent, self.state)
