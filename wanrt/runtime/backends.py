"""The Backend seam: one small protocol per component kind. The pipeline holds a `Backends` and never
asks which implementation runs (eager PyTorch, ONNX Runtime, AOTInductor, TensorRT).

All tensors cross the seam in the I/O spec's layout (see wanrt/export/specs.py):
- text encoder: (ids, mask) int64 (B, 512) -> (B, 512, text_dim), rows after each prompt exactly zero;
- image encoder: pixels (N, 3, S, S) CLIP-normalised -> (N, tokens, clip_dim);
- dit: (x, t, context, clip_fea, y) -> velocity, batch 2 (cond, uncond) for CFG;
- vae: encode_chunk / decode_chunk with explicit caches (None for the first chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from wanrt.models.loading import WanModels


class TextEncoderBackend(Protocol):
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class ImageEncoderBackend(Protocol):
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class DiTBackend(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor: ...


class VAEBackend(Protocol):
    def encode_chunk(self, x: torch.Tensor, caches: list[torch.Tensor] | None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def decode_chunk(self, z: torch.Tensor, caches: list[torch.Tensor] | None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@dataclass
class Backends:
    text_encoder: TextEncoderBackend
    image_encoder: ImageEncoderBackend
    dit: DiTBackend
    vae: VAEBackend
    names: dict[str, str] = field(default_factory=dict)  # component -> backend name, for reports


class EagerDiT:
    """The PyTorch DiT with its RoPE tables built once per token grid (not once per step)."""

    def __init__(self, model):
        self.model = model
        self._rope: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, x, t, context, clip_fea, y):
        grid = self.model.grid(x)
        if grid not in self._rope:
            self._rope[grid] = self.model.rope(*grid)
        return self.model(x, t, context, clip_fea, y, rope=self._rope[grid])


class _NoGrad:
    def __init__(self, fn):
        self.fn = fn

    @torch.no_grad()
    def __call__(self, *args):
        return self.fn(*args)


def eager(models: WanModels) -> Backends:
    """The reference backends: the PyTorch modules themselves."""
    vae = models.vae
    return Backends(
        text_encoder=_NoGrad(models.text_encoder), image_encoder=_NoGrad(models.image_encoder),
        dit=EagerDiT(models.dit), vae=vae,
        names=dict.fromkeys(("text_encoder", "image_encoder", "dit", "vae"), "eager"),
    )
