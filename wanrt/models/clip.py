"""The CLIP ViT-H/14 image tower as `transformers.CLIPVisionModel`, with the official preprocessing.

The official code (wan/modules/clip.py, open-clip xlm-roberta-large ViT-H/14) runs the first 31 of
32 pre-LN blocks and returns their output (no post-norm, no head); that equals transformers'
`hidden_states[-2]`. We build the tower one layer short, so the unused last block is never loaded.
Official `visual.*` keys load through `convert.clip_official_to_hf`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import CLIPConfig


def hf_config(cfg: CLIPConfig, num_layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu", layer_norm_eps=cfg.eps, num_channels=3,
    )


class CLIPImageEncoder(nn.Module):
    """forward(pixels (N, 3, S, S) normalised) -> (N, tokens, dim); `encode(frames in [-1, 1])`."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.num_layers_used = cfg.num_layers - 1  # features of the second-to-last layer
        self.model = CLIPVisionModel(hf_config(cfg, self.num_layers_used))
        self.register_buffer("mean", torch.empty(0), persistent=False)
        self.register_buffer("std", torch.empty(0), persistent=False)
        self.reset_buffers()  # on the meta device too: derived tables get their shapes

    def derived_buffers(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Non-weight tensors: CLIP mean/std and transformers' position_ids."""
        n = self.model.embeddings.num_positions
        return {"model.embeddings.position_ids": torch.arange(n, device=device).expand((1, -1)),
                "mean": torch.tensor(self.cfg.mean, device=device).view(1, 3, 1, 1),
                "std": torch.tensor(self.cfg.std, device=device).view(1, 3, 1, 1)}

    def reset_buffers(self) -> None:
        """Recompute the derived tensors on the weights' device (after a meta-device load)."""
        device = self.model.embeddings.patch_embedding.weight.device
        for name, value in self.derived_buffers(device).items():
            owner, _, attr = name.rpartition(".")
            setattr(self.get_submodule(owner) if owner else self, attr, value)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, 3, H, W) in [-1, 1], any size -> (N, 3, S, S) CLIP-normalised, fp32.

        Official: squash (no crop) with torch bicubic, no antialias, then [-1,1] -> [0,1] -> mean/std.
        """
        size = (self.cfg.image_size, self.cfg.image_size)
        x = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        return (x * 0.5 + 0.5 - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        return self.model(pixel_values=pixels.to(dtype)).last_hidden_state

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self(self.preprocess(frames))
