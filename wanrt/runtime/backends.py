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

from wanrt.export.specs import COMPONENTS, GRAPHS
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
    def time_embeddings(self, timesteps):
        """e (n, dim), e0 (n, 6, dim) of integer timesteps: what a step cache measures (runtime/cache.py)."""
        return self.model.embed_time(timesteps)

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


class GraphTextEncoder:
    """A batch-1 text graph applied row by row (prompts are encoded once and cached by the pipeline).
    Each row is the graph's fresh output (the contract's `graph(...)`), so rows never share a buffer."""

    def __init__(self, graph):
        self.graph = graph

    def __call__(self, ids, mask):
        return torch.cat([self.graph(ids[i:i + 1], mask[i:i + 1])[0] for i in range(ids.shape[0])])


class GraphSingle:
    """A graph with one output, called like the module it replaces. `borrow=True` takes the engine's own
    output buffer without a copy (valid until the next call): only for a caller that consumes the result
    before calling again, like the denoising step (CFGStep reads the velocity into its guidance buffer)."""

    def __init__(self, graph, borrow: bool = False):
        self.graph = graph
        self.call = graph.borrow if borrow else graph
        self.capturable = getattr(graph, "capturable", False)  # AOTInductor / TensorRT: yes; ONNX Runtime: no

    def __call__(self, *tensors):
        return self.call(*tensors)[0]


class GraphDiT(GraphSingle):
    """The DiT graph, plus the engine dir's time-embedding table (e, e0 of every integer timestep,
    written next to the graphs at export/build) that a step cache measures; None if the dir has none."""

    def __init__(self, graph, time_table: tuple[torch.Tensor, torch.Tensor] | None = None, root=None):
        super().__init__(graph, borrow=True)  # the step consumes the velocity at once
        self.time_table = time_table
        self.root = root

    def time_embeddings(self, timesteps):
        if self.time_table is None:
            from wanrt.runtime.cache import CacheError, missing_table

            raise CacheError(missing_table(self.root))
        e, e0 = self.time_table
        rows = timesteps.to(e.device, torch.long)
        return e[rows], e0[rows]


class GraphVAE:
    """The four VAE chunk graphs as a VAEBackend (first chunk: no caches in). Latents, frames and caches
    are fresh tensors (the contract's `graph(...)`): decode_chunks keeps every chunk and feeds caches back."""

    def __init__(self, enc_first, enc, dec_first, dec):
        self.enc_first, self.enc, self.dec_first, self.dec = enc_first, enc, dec_first, dec

    def encode_chunk(self, x, caches):
        out = self.enc_first(x) if caches is None else self.enc(x, *caches)
        return out[0], out[1:]

    def decode_chunk(self, z, caches):
        out = self.dec_first(z) if caches is None else self.dec(z, *caches)
        return out[0], out[1:]




def graph_backends(graphs: dict, time_table=None, root=None) -> dict:
    """{component: backend} from contract graphs (wanrt.engine.graph.ContractGraph: ONNX Runtime sessions,
    AOTInductor packages, TensorRT plans) keyed by GRAPH_NAMES (a subset is fine). time_table: the engine
    dir's DiT time embeddings (step caching), root: the engine dir, for messages."""
    from wanrt.engine.graph import ContractGraph

    loose = sorted(n for n, g in graphs.items() if not isinstance(g, ContractGraph))
    if loose:
        raise TypeError(f"graphs {loose} are not ContractGraphs; wrap them (wanrt.engine.graph.FunctionGraph)")
    out = {}
    if "t5" in graphs:
        out["text_encoder"] = GraphTextEncoder(graphs["t5"])
    if "clip" in graphs:
        out["image_encoder"] = GraphSingle(graphs["clip"])
    if "dit" in graphs:
        out["dit"] = GraphDiT(graphs["dit"], time_table, root)  # borrowed output: the step consumes it at once
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

    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose from {', '.join(ENGINE_BACKENDS)}")
    m = Manifest.load(engine_dir)
    target = _pick_profile(m, width, height, frame_num)
    graphs = [g for c in components for g in GRAPHS[c]]
    if backend != "onnxruntime":  # built for this wanrt / library / device? (says how to rebuild)
        from wanrt.engine import loader

        loader.check_compatible(m, backend, Target(target.width, target.height, target.frame_num, m.batch),
                                device, graphs)
    m.check_integrity()  # nothing edited by hand: batch, config, specs are as written
    if checkpoint is not None:
        from wanrt.models.loading import Checkpoint

        fp = Checkpoint(checkpoint).fingerprint()
        if fp != m.checkpoint["fingerprint"]:
            raise EngineError(f"{engine_dir} was built from {m.checkpoint['path']}, not from {checkpoint} "
                              "(different fingerprint); rebuild it for this checkpoint")
    config = m.config()
    tok_dir = Path(engine_dir) / "tokenizer"  # absent for engines built from in-memory random weights
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.is_dir() else None
    target = Target(target.width, target.height, target.frame_num, m.batch)
    if lora is not None and "dit" in components:
        from wanrt.engine import check_lora

        check_lora(m, backend, target, lora)
    if backend == "onnxruntime":
        from wanrt.runtime.onnxruntime import load_graphs

        if device.type == "cpu" and m.precision != "fp32":
            raise EngineError(f"{engine_dir} holds {m.precision} graphs, which ONNX Runtime's CPU provider "
                              "cannot run (no bf16/fp8 kernels); export with --precision fp32 for it, or use CUDA")
        loaded = load_graphs(engine_dir, target, device, graphs)
    else:
        from wanrt.engine import loader

        loaded = loader.load(backend, m, target, device, graphs, lora=lora, checkpoint=checkpoint)
    time_table = load_time_table(m) if "dit" in components else None
    return graph_backends(loaded, time_table, engine_dir), config, tokenizer, target


def load_time_table(m) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e, e0) of every integer timestep from the engine dir's `dit_time` entry (sha256 checked), on the
    CPU (a step cache reads it once per request); None for engine dirs made before it existed."""
    from safetensors.torch import load_file

    if m.entry("tables", "dit_time") is None:
        return None
    entry = m.verify_files("tables", "dit_time")
    t = load_file(str(m.root / next(iter(entry["files"]))))
    return t["e"], t["e0"]


def _pick_profile(m, width, height, frame_num):
    from wanrt.engine.manifest import EngineError
    from wanrt.export.specs import Target

    profiles = m.profiles
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


# ------------------------------------------------------------------------------------------ assembler


class BackendChoiceError(ValueError):
    """The backend choice itself is wrong (unknown component or backend, a needed path missing)."""


@dataclass
class Assembled:
    """What `load_backends` returns: the Backends and what the pipeline needs beside them."""

    backends: Backends
    config: object  # WanConfig
    tokenizer: object
    target: object = None  # export.specs.Target when any component runs from an engine dir (fixed size)
    models: WanModels | None = None  # the eager models (for transforms: parallel splits, calibration hooks)


def load_backends(checkpoint=None, device: str | torch.device | None = None, *, backend: str = "eager",
                  overrides: dict[str, str] | None = None, engine_dir=None, size: tuple[int, int] | None = None,
                  frame_num: int | None = None, dtype: torch.dtype | None = None, memory: str = "resident",
                  components=COMPONENTS, models: WanModels | None = None, lora=None, **load_options) -> Assembled:
    """THE assembler: the Backends of `components` for eager PyTorch, engines of an engine dir, or a mix.

    backend: 'eager' | 'onnxruntime' | 'aoti' | 'tensorrt' for every component, `overrides` per component
    ({"vae": "eager"}). Engine components come from one profile of `engine_dir` (size (W, H) and frame_num
    select it; `checkpoint`, if given, must be the one the engines were built from). Eager components are
    loaded from `checkpoint` (dtype None: bf16 on CUDA, fp32 on the CPU; memory != 'resident': loaded on
    the CPU, the DiT moved to the device), or taken from `models` when given (e.g. random weights).
    `load_options` go to the eager loader unchanged (wanrt.models.loading.load). lora: [(file, scale), ...]
    merged into an eager DiT at load; an engine DiT must have been built with exactly these (None: as built).
    Components outside `components` are None in the result."""
    from wanrt.export.specs import check_components

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = dict(overrides or {})
    try:
        check_components(overrides)
    except ValueError as e:
        raise BackendChoiceError(f"{e} (in the backend overrides)") from None
    try:
        components = check_components(components)
    except ValueError as e:
        raise BackendChoiceError(str(e)) from None
    choice = dict.fromkeys(components, backend) | {c: b for c, b in overrides.items() if c in components}
    kinds = set(choice.values())
    bad = sorted(kinds - {"eager", *ENGINE_BACKENDS})
    if bad:
        raise BackendChoiceError(f"unknown backend(s) {bad}; choose from eager, {', '.join(ENGINE_BACKENDS)}")
    parts: dict = {}
    config = tokenizer = target = None
    for kind in sorted(kinds - {"eager"}):
        if engine_dir is None:
            raise BackendChoiceError(f"backend {kind!r} needs an engine dir (--engine_dir)")
        w, h = size if size is not None else (None, None)
        got, config, tokenizer, target = from_engine_dir(
            engine_dir, kind, device, w, h, frame_num, None if checkpoint is None else str(checkpoint),
            components=[c for c in components if choice[c] == kind], lora=lora)
        parts.update(got)
    eager_parts = [c for c in components if choice[c] == "eager"]
    modules: dict = {}
    if eager_parts:
        if models is None:
            from wanrt.models.loading import load

            if checkpoint is None:
                raise BackendChoiceError("a checkpoint path (or 'tiny') is needed for the eager backend")
            if dtype is None:
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            load_device = "cpu" if memory != "resident" else device  # offloaded models never all sit on the GPU
            models = load(checkpoint, device=load_device, dtype=dtype if dtype != torch.float32 else None,
                          components=eager_parts, lora=lora if "dit" in eager_parts else None, **load_options)
            if memory != "resident" and models.dit is not None:
                models.dit.to(device)
        ours = eager(models)
        missing = [c for c in eager_parts if getattr(ours, c) is None]
        if missing:
            raise BackendChoiceError(f"the given models lack {missing}")
        parts.update({c: getattr(ours, c) for c in eager_parts})
        modules = {c: m for c, m in ours.modules.items() if c in eager_parts}
        config = config or models.config
        if tokenizer is None and models.text_encoder is not None:
            tokenizer = models.text_encoder.tokenizer
    if tokenizer is None and checkpoint is not None and "text_encoder" in components:
        from wanrt.models.loading import Checkpoint

        tokenizer = Checkpoint(checkpoint).tokenizer()
    backends = Backends(parts.get("text_encoder"), parts.get("image_encoder"), parts.get("dit"), parts.get("vae"),
                        names=choice, modules=modules)
    return Assembled(backends, config, tokenizer, target, models)
