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
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # eager modules a memory policy may move


class EagerDiT:
    """The PyTorch DiT. RoPE tables are built once per token grid; `bind` precomputes, once per request,
    the context embedding (text MLP + image projection) and the timestep embeddings of the schedule."""

    capturable = True  # pure device work: the step can be recorded as a CUDA graph

    def __init__(self, model):
        self.model = model
        self._rope: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, x):
        grid = self.model.grid(x)
        if grid not in self._rope:
            self._rope[grid] = self.model.rope(*grid)
        return self._rope[grid]

    @torch.no_grad()
    def __call__(self, x, t, context, clip_fea, y):
        return self.model(x, t, context, clip_fea, y, rope=self.rope(x))

    @torch.no_grad()
    def bind(self, context, clip_fea, y, timesteps):
        """A `(x, t) -> velocity` for one request; t must be one of `timesteps` (looked up on the device)."""
        m = self.model
        ctx = m.embed_context(context, clip_fea)  # (B, 2N + 512, dim)
        e_tab, e0_tab = m.embed_time(timesteps)  # (n, dim), (n, 6, dim)
        row = torch.zeros(m.cfg.num_train_timesteps + 1, dtype=torch.long, device=timesteps.device)
        row[timesteps] = torch.arange(len(timesteps), device=timesteps.device)
        rope = self.rope(y)

        @torch.no_grad()
        def call(x, t):
            rows = row[t]
            return m(x, t, context, clip_fea, y, rope=rope, time_emb=(e_tab[rows], e0_tab[rows]), context_emb=ctx)

        return call


class _NoGrad:
    def __init__(self, fn):
        self.fn = fn

    @torch.no_grad()
    def __call__(self, *args):
        return self.fn(*args)


def eager(models: WanModels) -> Backends:
    """The reference backends: the PyTorch modules themselves (components not loaded stay None)."""
    def maybe(module, wrap):
        return None if module is None else wrap(module)

    modules = {"text_encoder": models.text_encoder, "image_encoder": models.image_encoder, "vae": models.vae,
               "dit": models.dit}
    return Backends(
        text_encoder=maybe(models.text_encoder, _NoGrad), image_encoder=maybe(models.image_encoder, _NoGrad),
        dit=maybe(models.dit, EagerDiT), vae=models.vae,
        names={c: "eager" for c, m in modules.items() if m is not None},
        modules={c: m for c, m in modules.items() if m is not None},
    )


ENGINE_BACKENDS = ("onnxruntime", "aoti", "tensorrt")
GRAPH_NAMES = ("t5", "clip", "dit", "vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder")


class GraphTextEncoder:
    """A batch-1 text graph applied row by row (prompts are encoded once and cached by the pipeline)."""

    def __init__(self, graph):
        self.graph = graph

    def __call__(self, ids, mask):
        return torch.cat([self.graph(ids[i:i + 1], mask[i:i + 1])[0] for i in range(ids.shape[0])])


class GraphSingle:
    """A graph with one output, called like the module it replaces."""

    def __init__(self, graph):
        self.graph = graph
        self.capturable = getattr(graph, "capturable", False)  # AOTInductor / TensorRT: yes; ONNX Runtime: no

    def __call__(self, *tensors):
        return self.graph(*tensors)[0]


class GraphVAE:
    """The four VAE chunk graphs as a VAEBackend (first chunk: no caches in)."""

    def __init__(self, enc_first, enc, dec_first, dec):
        self.enc_first, self.enc, self.dec_first, self.dec = enc_first, enc, dec_first, dec

    def encode_chunk(self, x, caches):
        out = self.enc_first(x) if caches is None else self.enc(x, *caches)
        return out[0], out[1:]

    def decode_chunk(self, z, caches):
        out = self.dec_first(z) if caches is None else self.dec(z, *caches)
        return out[0], out[1:]


COMPONENT_GRAPHS = {"text_encoder": ("t5",), "image_encoder": ("clip",), "dit": ("dit",),
                    "vae": ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder")}
COMPONENTS = tuple(COMPONENT_GRAPHS)


def graph_backends(graphs: dict) -> dict:
    """{component: backend} from graph callables `graph(*inputs) -> [outputs]` (any engine: ONNX
    Runtime sessions, AOTInductor packages, TensorRT plans) keyed by GRAPH_NAMES (a subset is fine)."""
    out = {}
    if "t5" in graphs:
        out["text_encoder"] = GraphTextEncoder(graphs["t5"])
    if "clip" in graphs:
        out["image_encoder"] = GraphSingle(graphs["clip"])
    if "dit" in graphs:
        out["dit"] = GraphSingle(graphs["dit"])
    if "vae_decoder" in graphs:
        out["vae"] = GraphVAE(graphs["vae_encoder_first"], graphs["vae_encoder"], graphs["vae_decoder_first"],
                              graphs["vae_decoder"])
    return out


def from_engine_dir(engine_dir, backend: str, device: torch.device, width: int | None = None,
                    height: int | None = None, frame_num: int | None = None, checkpoint: str | None = None,
                    components=COMPONENTS, lora=None):
    """Engine backends of `components` for one profile of an engine dir -> ({component: backend},
    WanConfig, tokenizer, Target).

    The manifest is checked first: a profile that does not exist, a --size/--frame_num that
    contradicts the engine, or a checkpoint other than the one it was built from is refused; so is a
    DiT built with LoRAs other than `lora` ([(file, scale), ...]; None accepts the engine as built).
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    from wanrt.engine.manifest import EngineError, Manifest
    from wanrt.export.specs import Target
    from wanrt.models.config import WanConfig

    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose from {', '.join(ENGINE_BACKENDS)}")
    m = Manifest.load(engine_dir)
    target = _pick_profile(m, width, height, frame_num)
    if checkpoint is not None:
        from wanrt.models.loading import Checkpoint

        fp = Checkpoint(checkpoint).fingerprint()
        if fp != m.data["checkpoint"]["fingerprint"]:
            raise EngineError(f"{engine_dir} was built from {m.data['checkpoint']['path']}, not from {checkpoint} "
                              "(different fingerprint); rebuild it for this checkpoint")
    config = WanConfig.from_dict(m.data["config"])
    tok_dir = Path(engine_dir) / "tokenizer"  # absent for engines built from in-memory random weights
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.is_dir() else None
    target = Target(target.width, target.height, target.frame_num, m.data["batch"])
    if lora is not None and "dit" in components:
        from wanrt.engine import check_lora

        check_lora(m, backend, target, lora)
    graphs = [g for c in components for g in COMPONENT_GRAPHS[c]]
    if backend == "onnxruntime":
        from wanrt.runtime.onnxruntime import load_graphs

        if device.type == "cpu" and m.data["precision"] != "fp32":
            raise EngineError(f"{engine_dir} holds {m.data['precision']} graphs, which ONNX Runtime's CPU provider "
                              "cannot run (no bf16/fp8 kernels); export with --precision fp32 for it, or use CUDA")
        loaded = load_graphs(engine_dir, target, device, graphs)
    else:
        from wanrt.engine import loader

        loaded = loader.load(backend, m, target, device, graphs)
    return graph_backends(loaded), config, tokenizer, target


def _pick_profile(m, width, height, frame_num):
    from wanrt.engine.manifest import EngineError
    from wanrt.export.specs import Target

    profiles = m.data.get("profiles", {})
    matches = [p for p in profiles.values()
               if (width is None or (p["width"], p["height"]) == (width, height))
               and (frame_num is None or p["frame_num"] == frame_num)]
    listing = ", ".join(f"{p['width']}*{p['height']} x {p['frame_num']} frames" for p in profiles.values()) or "none"
    if not matches:
        want = []
        if width is not None:
            want.append(f"size {width}*{height}")
        if frame_num is not None:
            want.append(f"{frame_num} frames")
        raise EngineError(f"{m.root} has no engine for {' and '.join(want)} (it holds: {listing}); "
                          "build one with `wanrt export/build --size W*H --frame_num N`")
    if len(matches) > 1:
        raise EngineError(f"{m.root} holds several profiles ({listing}); pick one with --size and --frame_num")
    p = matches[0]
    return Target(p["width"], p["height"], p["frame_num"])
