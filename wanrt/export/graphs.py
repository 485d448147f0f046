"""The export units: one small nn.Module per graph, with the I/O of wanrt.export.specs.

Each wraps the model as `self.net`, whose state_dict keys are the keys of that component's checkpoint
view (wanrt.models.loading), so an initializer `net.<key>` is filled from the checkpoint tensor `<key>`.
Tensors that are not weights (RoPE grid tables, timestep table, CLIP position ids, VAE latent stats)
are buffers whose real values `derived()` returns. Boundary tensors are fp32; casts to the internal
precision happen inside the graph, so a strongly typed TensorRT build keeps the fp32 islands.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wanrt.models.config import WanConfig
from wanrt.models.dit import WanDiT, rope_grid, to_precision

from .specs import GraphSpec, Target


class DiTGraph(nn.Module):
    """(x, t, context, clip_fea, y) -> velocity, RoPE tables for the target grid baked in."""

    def __init__(self, net: WanDiT, target: Target):
        super().__init__()
        self.net = net
        t_lat, h, w = target.latent
        pt, ph, pw = net.cfg.patch_size
        self.grid = (t_lat // pt, h // ph, w // pw)
        n, half = self.grid[0] * self.grid[1] * self.grid[2], net.cfg.head_dim // 2
        device = net.patch_embedding.weight.device
        self.register_buffer("rope_cos", torch.empty(n, half, device=device))
        self.register_buffer("rope_sin", torch.empty(n, half, device=device))
        if device.type != "meta":  # a graph over loaded weights (AOTInductor): the real tables now
            d = self.derived()
            self.rope_cos, self.rope_sin = d["rope_cos"].to(device), d["rope_sin"].to(device)

    def derived(self) -> dict[str, torch.Tensor]:
        base = self.net.derived_buffers("cpu")
        cos, sin = rope_grid(base["rope_cos"], base["rope_sin"], self.net.cfg, *self.grid)
        return {"rope_cos": cos, "rope_sin": sin, **{f"net.{k}": v for k, v in base.items()}}

    def forward(self, x, t, context, clip_fea, y):
        return self.net(x, t, context, clip_fea, y, rope=(self.rope_cos, self.rope_sin))


class T5Graph(nn.Module):
    """(ids, mask) -> context with rows after the prompt exactly zero (the official trim + zero-pad)."""

    def __init__(self, net):
        super().__init__()
        self.net = net  # transformers UMT5EncoderModel

    def derived(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, ids, mask):
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).float()


class CLIPGraph(nn.Module):
    """CLIP-normalised pixels -> tokens of the second-to-last layer."""

    def __init__(self, net):
        super().__init__()
        self.net = net  # transformers CLIPVisionModel, one layer short (see models/clip.py)

    def derived(self) -> dict[str, torch.Tensor]:
        return {"net.embeddings.position_ids": torch.arange(self.net.embeddings.num_positions).expand((1, -1))}

    def forward(self, pixels):
        dtype = self.net.embeddings.patch_embedding.weight.dtype
        return self.net(pixel_values=pixels.to(dtype)).last_hidden_state.float()


class VAEChunkGraph(nn.Module):
    """One VAE chunk step: (chunk, caches...) -> (out, new caches...); `first` has no cache inputs."""

    def __init__(self, net, kind: str, first: bool):
        super().__init__()
        self.net, self.kind, self.first = net, kind, first

    def derived(self) -> dict[str, torch.Tensor]:
        return {f"net.{k}": v for k, v in self.net.derived_buffers("cpu").items()}

    def forward(self, x, *caches):
        step = self.net.encode_chunk if self.kind == "encoder" else self.net.decode_chunk
        out, new = step(x, None if self.first else list(caches))
        return (out, *new)


def build_graph(graph: str, cfg: WanConfig, target: Target, precision: str, device: str = "meta") -> nn.Module:
    """The export module of `graph` on `device` (meta: no weights; export streams them from the checkpoint)."""
    from wanrt.models.clip import CLIPImageEncoder
    from wanrt.models.t5 import T5TextEncoder
    from wanrt.models.vae import WanVAE

    low = torch.bfloat16 if precision in ("bf16", "fp8") else None
    with torch.device(device):
        if graph == "dit":
            net = WanDiT(cfg.dit)
            if low:
                to_precision(net, low)
            return DiTGraph(net, target).eval()
        if graph == "t5":
            net = T5TextEncoder(cfg.t5).model
            return T5Graph(net.to(low) if low else net).eval()
        if graph == "clip":
            net = CLIPImageEncoder(cfg.clip).model
            return CLIPGraph(net.to(torch.float16) if low else net).eval()  # the official CLIP runs in fp16
        if graph.startswith("vae_"):
            kind = "encoder" if graph.startswith("vae_encoder") else "decoder"
            return VAEChunkGraph(WanVAE(cfg.vae), kind, first=graph.endswith("_first")).eval()
    raise ValueError(f"unknown graph {graph!r}")


def graph_module(graph: str, models, target: Target) -> nn.Module:
    """The export module of `graph` over already loaded models (wanrt.models.load), e.g. for AOTInductor."""
    if graph == "dit":
        return DiTGraph(models.dit, target).eval()
    if graph == "t5":
        return T5Graph(models.text_encoder.model).eval()
    if graph == "clip":
        return CLIPGraph(models.image_encoder.model).eval()
    if graph.startswith("vae_"):
        kind = "encoder" if graph.startswith("vae_encoder") else "decoder"
        return VAEChunkGraph(models.vae, kind, first=graph.endswith("_first")).eval()
    raise ValueError(f"unknown graph {graph!r}")


def example_inputs(spec: GraphSpec, device: str = "meta") -> tuple[torch.Tensor, ...]:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    return tuple(torch.zeros(t.shape, dtype=dtypes[t.dtype], device=device) for t in spec.inputs)

