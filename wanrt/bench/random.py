"""Random weights at any size, made directly on the target device: `random:<config>` for the bench.

`wanrt.models.tiny.random_models` draws every tensor on the CPU in fp32, fine for toy widths but
minutes and ~100 GB of host memory for the 14B config. Here the modules are built on the meta device,
given their final dtypes there (the official precision map, so no fp32 copy of a bf16 weight ever
exists), allocated once with `to_empty` on the device and filled in place by the device's own RNG.
The value scheme is the tiny checkpoints' (fan-in scaled matrices, norm weights near 1, small biases,
modulation and position tables at 0.1 scale), which keeps activations in a realistic range through
40 layers, so timings are not distorted by NaN/denormal paths.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from wanrt.models.config import WanConfig
from wanrt.models.loading import COMPONENTS, WanModels, build


def parse(spec: str) -> WanConfig:
    """'random:flf2v-14b' / 'random:small' / 'random:tiny' -> the preset config."""
    if not spec.startswith("random:"):
        raise ValueError(f"expected random:<config>, got {spec!r}")
    return WanConfig.preset(spec.split(":", 1)[1])


def random_models(config: WanConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  seed: int = 0, components: Iterable[str] = COMPONENTS, tokenizer: bool = False) -> WanModels:
    """The models of `config` with deterministic random weights on `device`.

    dtype None or fp32: everything fp32. bf16/fp16: the precision map `wanrt.models.load` applies to a
    checkpoint (DiT matmuls in dtype with fp32 islands, T5 in dtype, CLIP in fp16, VAE fp32).
    tokenizer=True attaches a small sentencepiece tokenizer to the text encoder (only the pipeline
    needs one; training it takes about a second).
    """
    from wanrt.models.dit import to_precision

    device = torch.device(device)
    components = tuple(components)
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    models = build(config, device="meta", components=components)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name in components:
        module = getattr(models, name)
        if low is not None:  # final dtypes while still on meta: no full-precision copy is ever allocated
            if name == "dit":
                to_precision(module, low)
            elif name == "text_encoder":
                module.to(low)
            elif name == "image_encoder":
                module.to(torch.float16)
        module.to_empty(device=device)
        _fill(module, gen)
        if hasattr(module, "reset_buffers"):  # derived tables (RoPE, time sinusoids, VAE mean/std, CLIP ids)
            module.reset_buffers()
        module.eval().requires_grad_(False)
    if tokenizer and models.text_encoder is not None:
        from wanrt.models.tiny import make_tokenizer

        models.text_encoder.tokenizer = make_tokenizer(config.t5.vocab_size)
    left = [f"{n}.{p}" for n in components for p, t in
            (*getattr(models, n).named_parameters(), *getattr(models, n).named_buffers()) if t.is_meta]
    if left:  # a buffer nobody recomputed would be garbage that silently skews the benchmark
        raise RuntimeError(f"tensors still on the meta device: {left[:5]}")
    models.source = f"random:{config.name}"
    return models


@torch.no_grad()
def _fill(module: torch.nn.Module, gen: torch.Generator) -> None:
    """In-place, per tensor: the value scheme of wanrt.models.tiny._randomize, without host copies."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "modulation" in name or "emb_pos" in name:
            p.normal_(0.0, 0.1, generator=gen)
        elif leaf == "gamma" or (p.ndim == 1 and leaf == "weight"):
            p.normal_(1.0, 0.1, generator=gen)
        elif leaf == "bias" or p.ndim == 1:
            p.normal_(0.0, 0.05, generator=gen)
        else:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in**-0.5, generator=gen)
    for _, b in module.named_buffers():  # persistent buffers (none today) get defined values, not garbage
        if b.is_floating_point():
            b.zero_()


def parameter_count(config: WanConfig, components: Iterable[str] = COMPONENTS) -> int:
    """Number of parameters of the given components, counted on the meta device (no memory)."""
    models = build(config, device="meta", components=tuple(components))
    return sum(p.numel() for n in components for p in getattr(models, n).parameters())


def dit_step(width: int, height: int, frame_num: int, layers: int | None = None,
             config: WanConfig | None = None, device: str | torch.device = "cuda",
             dtype: torch.dtype | None = torch.bfloat16, seed: int = 0):
    """The DiT's batch-2 CFG step graph (`export.graphs.graph_module("dit")`) with random weights (default:
    the 14B config, `layers` of its identical blocks) at width x height x frame_num, and random inputs
    of its spec (timestep 999). Returns (config, module, inputs); for the GPU scripts in benchmarks/."""
    import dataclasses

    from wanrt.export.graphs import graph_module
    from wanrt.export.specs import Target, graph_specs

    cfg = config or WanConfig.flf2v_14b()
    if layers is not None:
        cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, num_layers=layers))
    device = torch.device(device)
    target = Target(width, height, frame_num)
    spec = graph_specs(cfg, target)["dit"]
    models = random_models(cfg, device=device, dtype=dtype, seed=seed, components=("dit",))
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = [torch.randn(t.shape, generator=g, device=device) if t.dtype == "float32"
              else torch.full(t.shape, 999, dtype=torch.int64, device=device) for t in spec.inputs]
    return cfg, graph_module("dit", models, target), inputs
