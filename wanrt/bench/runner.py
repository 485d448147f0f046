"""`wanrt.bench.run`: every requested backend against eager PyTorch, in one process, interleaved.

Method, per component (dit_step, vae_encode, vae_decode, text_encoder, image_encoder, e2e):
1. every backend gets the SAME input tensors (made once from a seed on the CPU);
2. warm-up: `warmup` untimed calls per backend (first-call allocations, autotuning, lazy init);
3. `repeat` rounds; in each round every backend is called once, the order rotated by one each round,
   so a noisy phase of the machine (another process, clock boost, thermal drop) hits all backends alike
   instead of the one that happened to run then;
4. each timed call: restore the inputs (untimed), synchronise the device, start the clock and the
   memory probe, call, synchronise, stop. Min / median / max over the rounds; ratios use the median;
5. quality: the last output of each backend vs eager's on the same inputs (dit_step: the guided
   velocity uncond + g * (cond - uncond) that the scheduler consumes; e2e: the uint8 frames): PSNR
   (peak = the eager output's value range max - min; 255 for frames) and max absolute error.

A backend that cannot run here (no wanrt.engine.build yet, tensorrt not installed, no CUDA device,
an engine dir built for something else) gets a row whose status is "unavailable: <reason>"; one that
raised while building, loading or running gets "failed: <error>". No backend is ever replaced by another.

By default all backends are resident at once (needed for interleaving). `interleave=False` loads,
measures and releases one backend at a time, for models too large to hold twice on one device
(two copies of the 14B DiT do not fit in 80 GB): the rows then say so in `settings.interleave`.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wanrt.models.config import WanConfig

from . import flops as flops_mod
from .hardware import DeviceInfo, MemoryProbe, describe, sync, versions

BACKENDS = ("eager", "onnxruntime", "aoti", "tensorrt")
ENGINE_BACKENDS = BACKENDS[1:]
# Eager variants, named `eager+<option>[+<option>...]`: the same eager modules with a load-time transform
# or a kernel choice, each a row measured against plain eager (the reference) on the same inputs.
EAGER_OPTIONS = {
    "fp8": "DiT block GEMMs in FP8 (wanrt.kernels.fp8; --fp8_keep blocks at each end stay bf16)",
    "fused": "exact fusion: q/k/v and cross-attention k/v as one GEMM each (wanrt.kernels.fusion)",
    "compiled": "regional torch.compile of each DiT block: Inductor fuses the elementwise work around the GEMMs "
                "(wanrt.kernels.fusion.compile_blocks; the first call compiles, outside the timing)",
    "sage": "8-bit attention (Triton: INT8 Q.K with K smoothing, FP8 P.V)",
    "flash": "our bf16 flash attention (Triton)",
    "triton": "Triton norm/RoPE kernels (wanrt.kernels.fused)",
}
_ATTENTION_OPTIONS = ("sage", "flash")
COMPONENTS = ("dit_step", "vae_encode", "vae_decode", "text_encoder", "image_encoder", "e2e")
# --what names -> the components they time ("vae" is both directions).
WHAT = {"dit_step": ("dit_step",), "vae": ("vae_encode", "vae_decode"), "vae_encode": ("vae_encode",),
        "vae_decode": ("vae_decode",), "text_encoder": ("text_encoder",), "image_encoder": ("image_encoder",),
        "e2e": ("e2e",)}
OLD_WHAT = {"t5": "text_encoder", "clip": "image_encoder"}  # earlier spellings: refused with the new name
# The runtime components (export.specs.TABLE: WanModels attributes, Backend seam slots, export/build
# components) each bench component needs (the VAE is all four chunk graphs: both directions are built).
_MODELS = {"dit_step": ("dit",), "vae_encode": ("vae",), "vae_decode": ("vae",), "text_encoder": ("text_encoder",),
           "image_encoder": ("image_encoder",), "e2e": ("text_encoder", "image_encoder", "dit", "vae")}
# Default (width, height, frame_num) per model: the toy configs get sizes that run in seconds on a CPU.
DEFAULT_TARGETS = {"tiny": (64, 48, 9), "small": (256, 256, 9), "flf2v-14b": (1280, 720, 81)}
FULL_TARGET = (1280, 720, 81)
# random:<config> engines need a checkpoint folder; the bench writes one only when the DiT is small (the
# tiny writer draws every tensor on the CPU in fp32: fine for ~0.1B parameters, not for the 16B DiT).
MAX_WRITTEN_DIT_PARAMS = 1_000_000_000
SCHEDULE_STEPS = 50  # the scheduler table a dit_step is taken from (the official default)
STEP_INDEX = 1  # a steady-state UniPC step (predictor + corrector), not the order-1 first one
GUIDE_SCALE, SHIFT = 5.0, 16.0


class Unavailable(Exception):
    """This backend cannot run on this machine or for this input; the message says why."""


# --------------------------------------------------------------------------------------------- results


# The quality gate every fast row is held to, as issue 14 sets it: its error against eager on the same inputs. A
# DiT step may move by 2e-2 rel. L2 (FP8 GEMMs + 8-bit attention are the fastest path it must admit; not measured
# at 14B yet); a video must stay >= 30 dB PSNR (the tiny fp8 video: 43.3 dB vs fp32). Rows of other components
# carry their error ungated.
QUALITY_GATE = {"dit_step": ("rel_l2", 2e-2), "e2e": ("psnr", 30.0)}


@dataclass
class Row:
    backend: str
    component: str
    status: str = "ok"  # "ok" | "unavailable: <why>" | "failed: <error>"
    device: str = ""
    shape: dict = field(default_factory=dict)
    times_s: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    flops: int | None = None
    setup_s: float | None = None  # engine build (or export) + load, or model load for eager
    psnr: float | None = None
    max_abs_err: float | None = None
    rel_l2: float | None = None  # ||out - eager|| / ||eager|| over the whole output
    profile: dict | None = None  # --profile: per-op-class breakdown of one call (bench/profile.py)
    speedup_vs_eager: float | None = None  # eager median / this median (> 1: faster than eager)
    peak_tflops: float | None = None  # the device's dense BF16 peak, for pct_peak
    dit_calls: int | None = None  # e2e: DiT calls of one video (fewer than the steps with step caching)
    quality: str | None = None  # QUALITY_GATE verdict vs eager: "pass" | "fail: <why, with the number>"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.times_s)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def tflops(self) -> float | None:
        m = self.median_s
        return self.flops / m / 1e12 if (self.flops and m) else None

    @property
    def pct_peak(self) -> float | None:
        t = self.tflops
        return 100.0 * t / self.peak_tflops if (t is not None and self.peak_tflops) else None

    def to_dict(self) -> dict:
        t = self.times_s
        return {
            "backend": self.backend, "component": self.component, "status": self.status, "device": self.device,
            "shape": self.shape,
            "times": {"runs_s": t, "min_s": min(t) if t else None, "median_s": self.median_s,
                      "max_s": max(t) if t else None, "mean_s": statistics.fmean(t) if t else None},
            "speedup_vs_eager": self.speedup_vs_eager, "memory": self.memory, "flops": self.flops,
            "tflops": self.tflops, "pct_peak": self.pct_peak, "psnr": self.psnr, "max_abs_err": self.max_abs_err,
            "rel_l2": self.rel_l2, "setup_s": self.setup_s, "dit_calls": self.dit_calls, "profile": self.profile,
            "quality": self.quality,
        }


@dataclass
class Report:
    rows: list[Row]
    device: DeviceInfo
    versions: dict
    settings: dict
    notes: list[str] = field(default_factory=list)

    def row(self, backend: str, component: str) -> Row:
        return next(r for r in self.rows if r.backend == backend and r.component == component)

    def to_dict(self) -> dict:
        from . import SCHEMA

        return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": self.device.to_dict(),
                "versions": self.versions, "settings": self.settings, "notes": self.notes,
                "results": [r.to_dict() for r in self.rows]}

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status.startswith("failed")]


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where the weights come from: a checkpoint folder (also what engines are built from) or random."""

    spec: str
    config: WanConfig
    folder: Path | None  # None: random weights made in memory only
    preset: str | None  # "tiny" / "small" / "flf2v-14b" for built-in and random specs


def resolve_source(ckpt_dir: str, engines_wanted: bool, work_dir: Path, seed: int,
                   log: Callable[[str], None]) -> Source:
    from wanrt.models.loading import Checkpoint

    if ckpt_dir.startswith("random:"):
        from .random import parameter_count, parse

        config = parse(ckpt_dir)
        preset = config.name
        if not engines_wanted or parameter_count(config, ["dit"]) > MAX_WRITTEN_DIT_PARAMS:
            return Source(ckpt_dir, config, None, preset)
        folder = work_dir / f"random-checkpoint-{preset}-seed{seed}"
        if not (folder / "config.json").is_file():  # written once per engine dir, then reused
            from wanrt.models import tiny

            log(f"writing random {preset} weights to {folder} (engines are built from a checkpoint folder)")
            tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=work_dir))
            try:
                tiny.write(tmp, layout="official", seed=seed, config=config)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        # eager loads this folder too, so every backend runs the very same weights
        return Source(ckpt_dir, Checkpoint(folder).config, folder, preset)
    ckpt = Checkpoint(ckpt_dir)
    preset = ckpt_dir if ckpt_dir in ("tiny", "tiny-random") else None  # the built-in ones, by name
    return Source(ckpt_dir, ckpt.config, ckpt.folder, preset)


# --------------------------------------------------------------------------------------------- inputs


class Inputs:
    """The tensors every backend receives, made on the CPU on first use (a dit_step-only run of the 14B
    config never builds the 0.9 GB conditioning video). Each input has its own generator, so its values
    do not depend on which other components are benched."""

    def __init__(self, config: WanConfig, width: int, height: int, frame_num: int, seed: int):
        self.config, self.width, self.height, self.frame_num, self.seed = config, width, height, frame_num, seed
        self.latent_shape = flops_mod.latent_shape(height, width, frame_num, config.vae.temporal_stride,
                                                   config.vae.spatial_stride)
        self._cache: dict[str, object] = {}

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)

    def _get(self, name, make):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def dit(self) -> dict[str, torch.Tensor]:
        """latent (1, 16, T, h, w), context (2, 512, text_dim): cond/uncond, clip_fea (1, 2N, clip_dim),
        y (1, 20, T, h, w): the FLF2V mask channels, then a conditioning latent."""
        def make():
            from wanrt.pipeline import flf2v_mask

            g, d = self._gen(1), self.config.dit
            t, h, w = self.latent_shape
            # T5-like context: unit-scale rows for the prompt, exact zeros after it (what the encoder emits)
            context = torch.randn(2, d.text_len, d.text_dim, generator=g) * 0.2
            context[0, 24:] = 0
            context[1, 120:] = 0
            y = torch.cat([flf2v_mask(self.frame_num, h, w), torch.randn(16, t, h, w, generator=g)])[None]
            return {"latent": torch.randn(1, d.out_dim, t, h, w, generator=g), "context": context,
                    "clip_fea": torch.randn(1, 2 * d.clip_tokens, d.clip_dim, generator=g), "y": y}

        return self._get("dit", make)

    @property
    def frames(self) -> tuple:
        """(first, last) PIL images at exactly width x height (so eager and engines see the same size)."""
        from wanrt.samples import sample_frames

        return self._get("frames", lambda: sample_frames(self.width, self.height))

    @property
    def video(self) -> torch.Tensor:
        """(1, 3, F, H, W): the pipeline's conditioning video [first, zeros, last], the vae_encode input."""
        def make():
            from wanrt.pipeline import conditioning_video
            from wanrt.video import load_image

            first, last = self.frames
            return conditioning_video(load_image(first), load_image(last), self.frame_num, self.height,
                                      self.width)

        return self._get("video", make)

    @property
    def z(self) -> torch.Tensor:
        return self._get("z", lambda: torch.randn(1, self.config.vae.z_dim, *self.latent_shape,
                                                  generator=self._gen(2)))

    @property
    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (2, 512): a 24- and a 120-token prompt, EOS (id 1) last, padding 0."""
        def make():
            g, t5 = self._gen(3), self.config.t5
            ids = torch.zeros(2, t5.text_len, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for row, n in enumerate((24, 120)):
                n = min(n, t5.text_len)
                ids[row, :n - 1] = torch.randint(3, t5.vocab_size, (n - 1,), generator=g)
                ids[row, n - 1] = 1
                mask[row, :n] = 1
            return ids, mask

        return self._get("text", make)

    @property
    def pixels(self) -> torch.Tensor:
        c = self.config.clip
        return self._get("pixels", lambda: torch.randn(2, 3, c.image_size, c.image_size, generator=self._gen(4)))


def make_inputs(config: WanConfig, width: int, height: int, frame_num: int, seed: int) -> Inputs:
    return Inputs(config, width, height, frame_num, seed)


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    call: Callable[[], torch.Tensor]  # the timed work; returns the output to compare
    reset: Callable[[], None]  # untimed: restore the inputs, so every call does identical work
    shape: dict
    info: dict = field(default_factory=dict)  # facts the call reports (e2e: dit_calls)


def make_case(component: str, loaded: Loaded, inputs: Inputs, device: torch.device, width: int, height: int,
              frame_num: int, sample_steps: int, cache: tuple[str, float | None] = ("none", None)) -> Case:
    b = loaded.backends
    if component == "dit_step":
        return _dit_step_case(b.dit, inputs, device)
    if component == "vae_encode":
        from wanrt.models.vae import encode_chunks

        video = inputs.video.to(device)
        return Case(lambda: encode_chunks(b.vae.encode_chunk, video), _noop,
                    {"video": list(video.shape)})
    if component == "vae_decode":
        from wanrt.models.vae import decode_chunks

        z = inputs.z.to(device)
        return Case(lambda: decode_chunks(b.vae.decode_chunk, z), _noop, {"latent": list(z.shape)})
    if component == "text_encoder":
        ids, mask = (x.to(device) for x in inputs.text)
        return Case(lambda: b.text_encoder(ids, mask), _noop, {"ids": list(ids.shape), "mask": list(mask.shape)})
    if component == "image_encoder":
        pixels = inputs.pixels.to(device)
        return Case(lambda: b.image_encoder(pixels), _noop, {"pixels": list(pixels.shape)})
    if component == "e2e":
        return _e2e_case(loaded, inputs, device, width, height, frame_num, sample_steps, cache)
    raise ValueError(f"unknown component {component!r}")


def _noop() -> None:
    return None


def _dit_step_case(dit, inputs: Inputs, device: torch.device) -> Case:
    """One denoising step exactly as the runtime runs it: runtime.step.CFGStep.step() (batch-2 DiT call,
    guidance, in-place UniPC update) at a steady-state index of the 50-step schedule. The backend's DiT
    is handed over unwrapped, so what CFGStep hoists out of the loop for it (the eager DiT's `bind`:
    context and timestep embeddings once per request) stays hoisted, as in a real run. Without the
    CUDA graph the 50-step loop replays on CUDA: launch overhead is included (negligible at 14B)."""
    import dataclasses

    from wanrt.runtime.step import CFGStep
    from wanrt.schedulers import make_scheduler

    d = {k: v.to(device) for k, v in inputs.dit.items()}
    scheduler = make_scheduler("unipc", SHIFT)
    scheduler.set_timesteps(SCHEDULE_STEPS, device=device)
    step = CFGStep(dit, d["context"], d["clip_fea"], d["y"], GUIDE_SCALE, scheduler, d["latent"])
    history = [getattr(step.state, f.name) for f in dataclasses.fields(step.state) if f.name != "coefficients"]

    def reset() -> None:  # in place: the same latent, step index and an empty solver history every call
        step.k.fill_(STEP_INDEX)
        step.latent.copy_(d["latent"])
        for buf in history:
            buf.zero_()

    def call() -> torch.Tensor:
        step.step()
        return step.guided  # uncond + g * (cond - uncond): the DiT's output as the scheduler consumes it

    shape = {"x": list(step.x.shape), "t": list(step.t.shape), "context": list(step.context.shape),
             "clip_fea": list(step.clip_fea.shape), "y": list(step.y.shape), "output": list(step.guided.shape)}
    return Case(call, reset, shape)


def _e2e_case(loaded: Loaded, inputs: Inputs, device, width, height, frame_num, sample_steps,
              cache: tuple[str, float | None] = ("none", None)) -> Case:
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.samples import SAMPLE_PROMPT

    holder: dict = {}

    def reset() -> None:  # a fresh pipeline per call: its prompt cache must not skip T5 on repeats
        holder["pipe"] = FLF2VPipeline(loaded.backends, loaded.config, loaded.tokenizer, device,
                                       target=loaded.target)

    info: dict = {}

    def call() -> torch.Tensor:
        video = holder["pipe"](*inputs.frames, SAMPLE_PROMPT, max_area=width * height, frame_num=frame_num,
                               sample_steps=sample_steps, seed=0, progress=False, cache=cache[0],
                               cache_threshold=cache[1])
        info["dit_calls"] = video.dit_calls
        return torch.from_numpy(video.frames)

    return Case(call, reset, {"frames": [inputs.frames[0].width, inputs.frames[0].height], "frame_num": frame_num,
                              "sample_steps": sample_steps, "output": [frame_num, height, width, 3]}, info)


# --------------------------------------------------------------------------------------------- backends


@dataclass
class Loaded:
    name: str
    backends: object  # wanrt.runtime.backends.Backends
    config: WanConfig
    tokenizer: object
    target: object  # export.specs.Target for engine backends, None for eager
    setup_s: float
    load_bytes: int
    models: object = None  # eager only: the WanModels (for a build API that takes in-memory models)
    options: tuple[str, ...] = ()  # eager variants: the EAGER_OPTIONS applied

    def kernels(self):
        """The kernel choice every call of this backend runs under (attention and fused-op seams)."""
        import contextlib

        from wanrt.kernels import attention as attention_seam
        from wanrt.kernels import fused

        stack = contextlib.ExitStack()
        att = next((o for o in self.options if o in _ATTENTION_OPTIONS), None)
        if att is not None:
            stack.enter_context(attention_seam.use(att))
        if "triton" in self.options:
            stack.enter_context(fused.use("triton"))
        return stack


def eager_options(name: str) -> tuple[str, ...]:
    """'eager+fp8+sage' -> ('fp8', 'sage'); 'eager' -> (). Raises ValueError for anything else."""
    base, *options = name.split("+")
    bad = [o for o in options if o not in EAGER_OPTIONS]
    if base != "eager" or bad or len(set(options)) != len(options) or \
            sum(o in _ATTENTION_OPTIONS for o in options) > 1:
        raise ValueError(f"backend {name!r}: eager variants are eager+<option>[+...] with options "
                         f"{', '.join(EAGER_OPTIONS)} (one attention kernel at most)")
    return tuple(options)


def _eager(source: Source, device: torch.device, precision: str, components: Sequence[str], seed: int,
           need_tokenizer: bool, name: str = "eager", fp8_keep: int = 0) -> Loaded:
    from wanrt.runtime.backends import load_backends

    options = eager_options(name)
    # eager runs fp32 or the bf16 map; under --precision fp8 plain eager stays bf16 (the reference) and
    # eager+fp8 quantises the DiT blocks on top of the bf16 map
    dtype = torch.float32 if precision == "fp32" and "fp8" not in options else torch.bfloat16
    models_needed = _runtime_parts(components)
    fp8 = "fp8" in options and "dit" in models_needed
    models, load_options = None, {}
    if source.folder is not None and fp8:
        load_options = {"precision": "fp8", "fp8_keep": fp8_keep}  # quantised by the loader, at load
    if source.folder is None:
        from .random import random_models

        models = random_models(source.config, device, dtype, seed=seed, components=models_needed,
                               tokenizer=need_tokenizer)
        if fp8:
            from wanrt.kernels.fp8 import quantize_blocks

            quantize_blocks(models.dit.blocks, keep=fp8_keep)
    got = load_backends(source.folder, device, dtype=dtype, components=models_needed, models=models,
                        **load_options)
    if "fused" in options and got.models.dit is not None:
        from wanrt.kernels.fusion import fuse_projections

        fuse_projections(got.models.dit)
    if "compiled" in options and got.models.dit is not None:
        from wanrt.kernels.fusion import compile_blocks

        compile_blocks(got.models.dit)
    return Loaded(name, got.backends, got.config, got.tokenizer, None, 0.0, 0, got.models, options)


def _runtime_parts(components: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for c in components for m in _MODELS[c]))


def _engine(name: str, source: Source, engine_dir: Path, target, device: torch.device, precision: str,
            components: Sequence[str], log, in_memory=None) -> Loaded:
    """onnxruntime (wanrt.export), aoti / tensorrt (wanrt.engine.build), then the runtime's one assembler
    (runtime.load_backends): the bench times exactly what `wanrt generate --backend` runs."""
    from wanrt.runtime.backends import load_backends

    if name == "onnxruntime":
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise Unavailable("onnxruntime on CUDA needs onnxruntime-gpu (pip install 'wanrt[gpu]'); this "
                                  f"onnxruntime has {ort.get_available_providers()}")
        elif precision != "fp32":
            raise Unavailable(f"ONNX Runtime's CPU provider has no {precision} kernels; use --precision fp32")
    elif name == "tensorrt":
        if device.type != "cuda":
            raise Unavailable("TensorRT needs a CUDA device")
        if importlib.util.find_spec("tensorrt") is None:
            raise Unavailable("tensorrt is not installed (pip install 'wanrt[tensorrt]')")
    folder = source.folder
    if folder is None and name == "onnxruntime":
        raise Unavailable(f"{source.spec} has no checkpoint folder to export ONNX from (the bench does not write "
                          "random weights of this size to disk); use a real --ckpt_dir")
    runtime_parts = _runtime_parts(components)
    parts = runtime_parts  # build only what is timed
    if name == "onnxruntime":
        from wanrt.engine.exporter import export

        export(folder, engine_dir, target, precision=precision, components=parts, log=log)
    else:
        from wanrt.engine import build

        if folder is None and in_memory is None:
            raise Unavailable(f"{source.spec} has no checkpoint folder to build {name} engines from; "
                              "use a real --ckpt_dir")
        if folder is None and name == "tensorrt":
            raise Unavailable("tensorrt engines are built from the ONNX export, which reads a checkpoint folder "
                              "(the bench does not write random 14B weights to disk); use a real --ckpt_dir")
        build(folder, engine_dir, target, backend=name, precision=precision, components=parts, log=log,
              device=device.type, models=in_memory if folder is None else None)
    got = load_backends(None if folder is None else str(folder), device, backend=name, engine_dir=engine_dir,
                        size=(target.width, target.height), frame_num=target.frame_num, components=runtime_parts)
    return Loaded(name, got.backends, got.config, got.tokenizer, got.target, 0.0, 0)


def _load(name, source, engine_dir, target, device, precision, components, seed, log, eager_models=None,
          fp8_keep: int = 0) -> Loaded:
    probe = MemoryProbe(device)
    before = probe.current()
    t0 = time.perf_counter()
    if name.startswith("eager"):
        loaded = _eager(source, device, precision, components, seed, need_tokenizer="e2e" in components,
                        name=name, fp8_keep=fp8_keep)
    else:
        loaded = _engine(name, source, engine_dir, target, device, precision, components, log, eager_models)
    sync(device)
    loaded.setup_s = time.perf_counter() - t0
    loaded.load_bytes = max(probe.current() - before, 0)
    return loaded


def _release(loaded: Loaded | None, device: torch.device) -> None:
    del loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_UNAVAILABLE = (Unavailable, ImportError, NotImplementedError)


def _classify(e: BaseException) -> str:
    from wanrt.engine.manifest import EngineError

    msg = f"{e}".splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, (*_UNAVAILABLE, EngineError)):
        return f"unavailable: {msg}"
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"failed: CUDA out of memory ({msg[:120]}); try interleave=False (--no-interleave)"
    return f"failed: {type(e).__name__}: {msg}"


# --------------------------------------------------------------------------------------------- run


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The call order of round `round_index`: the list rotated left by that many places."""
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def _compare(out: torch.Tensor, ref: torch.Tensor, component: str) -> tuple[float | None, float, float | None]:
    from wanrt.metrics import psnr

    a, b = out.detach().cpu().numpy().astype(np.float64), ref.detach().cpu().numpy().astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shape {a.shape} differs from eager's {b.shape}")
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not np.all(np.isfinite(a)):
        return None, float("nan"), None
    norm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(a - b)) / norm if norm else None
    peak = 255.0 if component == "e2e" else float(b.max() - b.min()) or 1.0
    value = psnr(a, b, peak=peak)
    return (None if value == float("inf") else round(value, 3)), err, rel


def _parse_list(value: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in allowed and not _is_eager_variant(v, allowed)]
    if bad or not items:
        raise ValueError(f"{what}: {', '.join(bad) or 'nothing'} not understood; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _is_eager_variant(name: str, allowed: Sequence[str]) -> bool:
    if "eager" not in allowed or not name.startswith("eager+"):
        return False
    try:
        eager_options(name)
    except ValueError:
        return False
    return True


def default_target(ckpt_dir: str) -> tuple[int, int, int]:
    """(width, height, frame_num) when none is given: small for the toy configs, 1280*720x81 otherwise."""
    if ckpt_dir in ("tiny", "tiny-random"):
        return DEFAULT_TARGETS["tiny"]
    if ckpt_dir.startswith("random:"):
        return DEFAULT_TARGETS.get(WanConfig.preset(ckpt_dir.split(":", 1)[1]).name, FULL_TARGET)
    return FULL_TARGET


def run(ckpt_dir: str = "tiny", size: tuple[int, int] | None = None, frame_num: int | None = None,
        backends: str | Sequence[str] = BACKENDS, what: str | Sequence[str] = ("dit_step",), repeat: int = 3,
        warmup: int = 1, precision: str = "auto", device: str | torch.device | None = None,
        engine_dir: str | Path | None = None, sample_steps: int = 2, seed: int = 0, interleave: bool = True,
        json_path: str | Path | None = None, plot_path: str | Path | None = None,
        log: Callable[[str], None] = print, command: str | None = None, cache: str = "none",
        cache_threshold: float | None = None, fp8_keep: int = 0, profile: bool = False) -> Report:
    """Measure `what` for every backend; returns the Report (and writes JSON / PNG when paths are given).

    size (W, H) and frame_num default per model (see DEFAULT_TARGETS). precision 'auto': fp32 on the
    CPU, bf16 (the official precision map) on CUDA; the engines are built at the same precision.
    engine_dir: where engines (and random checkpoints) are built and reused; default a temp dir,
    deleted afterwards. sample_steps: denoising steps of an e2e run. cache, cache_threshold: step caching
    of the e2e runs (runtime/cache.py); each e2e row records its DiT calls.
    backends: eager, onnxruntime, aoti, tensorrt, and eager variants eager+<option>[+...] (EAGER_OPTIONS:
    fp8, fused, sage, flash, triton). precision 'fp8': plain eager stays the bf16 reference, engines are
    built fp8, and eager+fp8 is added when no fp8 eager variant is listed. fp8_keep: DiT blocks kept
    bf16 at each end by every fp8 eager variant. profile: after timing, one more call per row under
    torch.profiler, its per-op-class breakdown in `Row.profile` (bench/profile.py).
    """
    from wanrt.export.specs import PRECISIONS, Target

    names = _parse_list(backends, BACKENDS, "backends")
    old = [w.strip() for w in what.split(",") if w.strip() in OLD_WHAT] if isinstance(what, str) else []
    if old:
        raise ValueError(f"--what {old[0]} is now called {OLD_WHAT[old[0]]}")
    wanted = _parse_list(what, tuple(WHAT), "what")
    components = list(dict.fromkeys(c for w in wanted for c in WHAT[w]))
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat} and {warmup}")
    from wanrt.runtime.cache import check as check_cache

    check_cache(cache, cache_threshold)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp8" and "eager" in names and not any("fp8" in eager_options(n) for n in names
                                                            if n.startswith("eager")):
        names.insert(names.index("eager") + 1, "eager+fp8")
    w0, h0, f0 = default_target(ckpt_dir)
    width, height = size or (w0, h0)
    frame_num = frame_num or f0
    target = Target(width, height, frame_num, batch=2)  # validates the size and frame count

    temp = engine_dir is None
    work = Path(tempfile.mkdtemp(prefix="wanrt-bench-")) if temp else Path(engine_dir)
    work.mkdir(parents=True, exist_ok=True)
    info = describe(device)
    notes: list[str] = []
    try:
        engines_wanted = any(n in ENGINE_BACKENDS for n in names)
        source = resolve_source(ckpt_dir, engines_wanted, work, seed, log)
        cfg = source.config
        if source.folder is None and engines_wanted:
            notes.append(f"{ckpt_dir}: random weights in memory only (too large to write a checkpoint), so "
                         "engine backends have nothing to build from")
        inputs = make_inputs(cfg, width, height, frame_num, seed)
        rows = {(b, c): Row(b, c, device=info.label, peak_tflops=info.peak_bf16_tflops) for c in components
                for b in names}
        for c in components:
            fl = flops_mod.component_flops(c, cfg, height, width, frame_num, sample_steps)
            for b in names:
                rows[(b, c)].flops = fl
        outputs: dict[tuple[str, str], torch.Tensor] = {}
        order = sorted(names, key=lambda n: not n.startswith("eager"))  # eager first: in-memory builds reuse it
        groups = [order] if interleave else [[n] for n in order]
        eager_models = None
        for group in groups:
            loaded: dict[str, Loaded] = {}
            for name in group:
                log(f"{name}: preparing")
                try:
                    loaded[name] = _load(name, source, work, target, device, precision, components, seed, log,
                                         eager_models, fp8_keep)
                    # in-memory engine builds take the eager models of their precision (fp8: eager+fp8's)
                    if interleave and name == ("eager+fp8" if precision == "fp8" else "eager"):
                        eager_models = loaded[name].models
                except Exception as e:  # noqa: BLE001 - recorded in the row, never hidden, never substituted
                    status = _classify(e)
                    log(f"{name}: {status}")
                    for c in components:
                        rows[(name, c)].status = status
            for c in components:
                _measure(c, loaded, rows, outputs, inputs, device, width, height, frame_num, sample_steps,
                         warmup, repeat, log, (cache, cache_threshold), profile)
            for name in list(loaded):
                _release(loaded.pop(name), device)
        _finish(rows, outputs, components, names)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)

    settings = {
        "command": command, "ckpt_dir": ckpt_dir, "config": source.preset or cfg.name, "size": [width, height],
        "frame_num": frame_num, "latent": list(flops_mod.latent_shape(height, width, frame_num)),
        "tokens": flops_mod.dit_tokens(cfg, height, width, frame_num), "precision": precision,
        "backends": names, "components": components, "repeat": repeat, "warmup": warmup,
        "interleave": interleave, "sample_steps": sample_steps, "seed": seed, "cache": cache,
        "cache_threshold": cache_threshold, "fp8_keep": fp8_keep, "profile": profile,
        "engine_dir": None if temp else str(work),
        "dit_step": f"CFGStep.step(): batch-2 DiT + guidance {GUIDE_SCALE} + UniPC update (step {STEP_INDEX} "
                    f"of {SCHEDULE_STEPS}, shift {SHIFT}), no CUDA graph",
    }
    report = Report([rows[(b, c)] for c in components for b in names], info, versions(), settings, notes)
    from .report import plot, write_json

    if json_path:
        write_json(report, json_path)
    if plot_path and plot(report, plot_path) is None:
        report.notes.append("no plot: matplotlib is not installed (pip install 'wanrt[plot]')")
        if json_path:
            write_json(report, json_path)
    return report


def _measure(component, loaded: dict[str, Loaded], rows, outputs, inputs, device, width, height, frame_num,
             sample_steps, warmup, repeat, log, cache: tuple[str, float | None] = ("none", None),
             profile: bool = False) -> None:
    cases: dict[str, Case] = {}
    for name, ld in loaded.items():
        row = rows[(name, component)]
        row.setup_s = round(ld.setup_s, 3)
        try:
            cases[name] = make_case(component, ld, inputs, device, width, height, frame_num, sample_steps, cache)
            row.shape = cases[name].shape
        except Exception as e:  # noqa: BLE001
            row.status = _classify(e)
    probe = MemoryProbe(device)
    peaks: dict[str, list[tuple[int, int, int | None]]] = {n: [] for n in cases}
    last: dict[str, torch.Tensor] = {}

    def once(name: str, timed: bool) -> None:
        case = cases[name]
        case.reset()
        sync(device)
        probe.start()
        t0 = time.perf_counter()
        out = case.call()
        sync(device)
        dt = time.perf_counter() - t0
        peak, delta = probe.stop()
        last[name] = out
        if timed:
            rows[(name, component)].times_s.append(dt)
            peaks[name].append((peak, delta, probe.device_used()))

    for name, case in cases.items():  # every call under this backend's kernel choice (eager variants)
        case.call = _under(case.call, loaded[name].kernels)
    with torch.no_grad():
        for r in range(warmup + repeat):
            for name in rotation(list(cases), r):
                try:
                    once(name, timed=r >= warmup)
                except Exception as e:  # noqa: BLE001 - a backend that breaks mid-run leaves the rotation
                    rows[(name, component)].status = _classify(e)
                    rows[(name, component)].times_s.clear()
                    log(f"{name} {component}: {rows[(name, component)].status}")
                    del cases[name]
    for name in cases:
        row = rows[(name, component)]
        p = peaks[name]
        row.memory = {"kind": probe.kind, "peak_bytes": max(x[0] for x in p), "delta_bytes": max(x[1] for x in p),
                      "load_bytes": loaded[name].load_bytes}
        if probe.kind == "cuda":
            row.memory["device_used_bytes"] = max(x[2] or 0 for x in p)
        outputs[(name, component)] = last[name].detach().to("cpu").clone()
        row.dit_calls = cases[name].info.get("dit_calls")
        log(f"{name} {component}: median {row.median_s * 1e3:.2f} ms over {len(row.times_s)} runs")
        if profile:  # one extra, untimed call: the profiler's overhead never reaches times_s
            from .profile import format_line, profile_call

            cases[name].reset()
            row.profile = profile_call(cases[name].call, device)
            log(format_line(name, component, row.profile))


def _under(call: Callable[[], torch.Tensor], kernels) -> Callable[[], torch.Tensor]:
    def wrapped() -> torch.Tensor:
        with kernels():
            return call()

    return wrapped


def _finish(rows, outputs, components, names) -> None:
    for c in components:
        eager_row = rows.get(("eager", c))
        ref = outputs.get(("eager", c))
        for b in names:
            row = rows[(b, c)]
            if not row.ok:
                continue
            if eager_row is not None and eager_row.ok:
                row.speedup_vs_eager = round(eager_row.median_s / row.median_s, 4)
            if ref is not None and b != "eager":
                try:
                    row.psnr, row.max_abs_err, row.rel_l2 = _compare(outputs[(b, c)], ref, c)
                except ValueError as e:
                    row.status = f"failed: {e}"
                    continue
                row.quality = quality(row)


def quality(row: Row) -> str | None:
    """The QUALITY_GATE verdict of a compared row (None for components without a gate). Non-finite output
    (no PSNR and a NaN error) fails; identical output (PSNR None, error 0) passes."""
    if row.component not in QUALITY_GATE:
        return None
    metric, bound = QUALITY_GATE[row.component]
    if row.max_abs_err is not None and not math.isfinite(row.max_abs_err):
        return "fail: non-finite output"
    if metric == "rel_l2":
        value = row.rel_l2 if row.rel_l2 is not None else 0.0
        return "pass" if value <= bound else f"fail: rel L2 {value:.3g} > {bound:g}"
    if row.psnr is None:  # identical to eager
        return "pass"
    return "pass" if row.psnr >= bound else f"fail: PSNR {row.psnr:.1f} dB < {bound:g} dB"
