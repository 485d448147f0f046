"""FLF2VPipeline: first frame + last frame + prompt -> video, the official procedure (spec section 6).

preprocess (size rule, resize, mask) -> text / image encoders -> VAE encode of [first, zeros, last]
-> denoising loop (one batch-2 DiT call per step for CFG) -> VAE decode. Every model call goes through
the Backend seam (wanrt/runtime/backends.py); this file never knows which backend runs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanrt.models.config import FLF2V_NEG_PROMPT, WanConfig
from wanrt.runtime.backends import Backends
from wanrt.schedulers import make_scheduler
from wanrt.video import load_image, to_uint8_frames, write_mp4

FPS = 16


class InputError(ValueError):
    """A request parameter is invalid; the message says which and how to fix it."""


@dataclass
class Video:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int = FPS
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # things the pipeline changed about the request
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes per stage (CUDA allocated, or RSS)
    backends: dict[str, str] = field(default_factory=dict)  # which backend ran each component

    def save(self, path: str | Path) -> Path:
        return write_mp4(self.frames, path, fps=self.fps)


# --------------------------------------------------------------------------------- official helpers


def target_size(height: int, width: int, max_area: int, vae_stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Latent (lat_h, lat_w) from the first frame's aspect ratio and the area budget (official rule:
    floor to multiples of vae_stride * patch pixels)."""
    aspect = height / width
    lat_h = round(np.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect) // vae_stride // patch * patch)
    return lat_h, lat_w


def official_center_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's tensor center_crop((h, w)): zero-pads when the crop is larger, then crops."""
    crop_h, crop_w = size
    h, w = img.shape[-2:]
    if crop_w > w or crop_h > h:
        pad = [(crop_w - w) // 2 if crop_w > w else 0, (crop_w - w + 1) // 2 if crop_w > w else 0,
               (crop_h - h) // 2 if crop_h > h else 0, (crop_h - h + 1) // 2 if crop_h > h else 0]
        img = F.pad(img, pad, value=0.0)
        h, w = img.shape[-2:]
        if (crop_h, crop_w) == (h, w):
            return img
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return img[..., top:top + crop_h, left:left + crop_w]


def match_last_frame(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The official handling of a last frame whose size differs from the first: scale factor from the
    sizes, then a center crop whose (W, H) list is read as (h, w) -- no actual resize. Kept as is for
    parity; feed same-size frames to avoid it."""
    (fh, fw), (lh, lw) = first.shape[-2:], last.shape[-2:]
    if (fh, fw) == (lh, lw):
        return last
    ratio = max(fw / lw, fh / lh)
    size = [round(lw * ratio), round(lh * ratio)]  # (W, H) order, consumed as (h, w) below
    return official_center_crop(last, (size[0], size[1]))


def crop_to_aspect(first: torch.Tensor, last: torch.Tensor, width: int, height: int
                   ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Center-crop both frames to width:height (an engine's fixed aspect ratio); a note when it crops."""
    h, w = first.shape[-2:]
    if abs(w * height - h * width) <= max(width, height):  # already that aspect (within a pixel)
        return first, last, None
    if w * height > h * width:  # too wide
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)

    def crop(img):
        ih, iw = img.shape[-2:]
        top, left = (ih - ch) // 2, (iw - cw) // 2
        return img[..., top:top + ch, left:left + cw]

    note = (f"frames are {w}x{h}; center-cropped to {cw}x{ch} to match the engine's {width}x{height} "
            "aspect ratio, then resized")
    return crop(first), crop(last), note


def flf2v_mask(frame_num: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """(4, T_lat, lat_h, lat_w): 1 where a pixel frame is given (first and last). The official code
    hard-codes 81 frames; this is the same construction for any frame_num = 4n + 1."""
    msk = torch.ones(1, frame_num, lat_h, lat_w)
    msk[:, 1:-1] = 0
    msk = torch.cat([msk[:, 0:1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)  # (1, F + 3, h, w)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


def conditioning_video(first: torch.Tensor, last: torch.Tensor, frame_num: int, height: int, width: int
                       ) -> torch.Tensor:
    """(1, 3, F, H, W): [first, zeros, last] with torch bicubic resizing (no antialias), on the CPU
    in fp32 as the official code does."""
    def resize(img):
        return F.interpolate(img[None].float().cpu(), size=(height, width), mode="bicubic").transpose(0, 1)

    zeros = torch.zeros(3, frame_num - 2, height, width)
    return torch.cat([resize(first), zeros, resize(last)], dim=1)[None]


def validate(cfg: WanConfig | None, frame_num: int, sample_steps: int, guide_scale: float, max_area: int,
             sample_solver: str, timesteps=None) -> None:
    """Request checks that need no model (cfg=None skips the model's RoPE limit)."""
    from wanrt.schedulers import SOLVERS, check_timesteps

    if frame_num < 5 or (frame_num - 1) % 4:
        raise InputError(f"frame_num must be 4n+1 and at least 5 (e.g. 81), got {frame_num}")
    if sample_steps < 1:
        raise InputError(f"sample_steps must be >= 1, got {sample_steps}")
    if guide_scale < 0:
        raise InputError(f"guide scale must be >= 0, got {guide_scale}")
    if sample_solver not in SOLVERS:
        raise InputError(f"sample_solver must be one of {', '.join(SOLVERS)}, got {sample_solver!r}")
    if timesteps is not None:
        try:
            check_timesteps(timesteps)
        except ValueError as e:
            raise InputError(str(e)) from None
    if max_area < 256:
        raise InputError(f"max_area must be at least 16*16 pixels, got {max_area}")
    t_lat = (frame_num - 1) // 4 + 1
    if cfg is not None and t_lat > cfg.dit.rope_max_len:
        raise InputError(f"frame_num {frame_num} exceeds the model's RoPE table ({cfg.dit.rope_max_len} latent frames)")


# --------------------------------------------------------------------------------------- pipeline


class FLF2VPipeline:
    """Loads once, serves many requests. Build with `from_pretrained`.

    Thread safety: a pipeline owns one device, and calls are serialized: concurrent callers wait for
    each other (a lock around each request), so N threads may share one pipeline. A request can be
    cancelled between denoising steps (`cancel=threading.Event()`), and a request that fails (bad
    input, cancellation, an error) leaves the pipeline ready for the next one: all per-request state
    lives in the request.
    """

    def __init__(self, backends: Backends, config: WanConfig, tokenizer, device: torch.device,
                 text_cache_size: int = 16, attention: str = "sdpa", kernels: str = "torch", target=None,
                 memory: str = "resident", cuda_graphs: bool = True):
        from wanrt.kernels import attention as attention_seam
        from wanrt.kernels import fused as fused_seam
        from wanrt.runtime.memory import MemoryPolicy

        attention_seam.check(attention)
        fused_seam.check(kernels)
        self.attention, self.kernels = attention, kernels  # kernel choice for eager model code
        self.target = target  # an engine's fixed (width, height, frame_num, batch), or None
        self.defaults = (81, 1280 * 720)  # frame_num and max_area when a request gives none (official)
        self.backends = backends
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()
        self.cuda_graphs = cuda_graphs
        self.memory = memory if isinstance(memory, MemoryPolicy) else MemoryPolicy(memory)
        self.memory.attach(backends.modules, self.device)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, attention: str = "sdpa", kernels: str = "torch",
                        backend: str = "eager", engine_dir: str | Path | None = None,
                        size: tuple[int, int] | None = None, frame_num: int | None = None,
                        memory: str = "resident", cuda_graphs: bool = True,
                        overrides: dict[str, str] | None = None, lora=None) -> FLF2VPipeline:
        """path: official or diffusers folder, or `tiny`. dtype None: the official precision map
        (bf16 matmuls, fp32 islands) on CUDA, fp32 on the CPU. attention: 'sdpa' | 'flash' | 'sage'
        (Triton); kernels: 'torch' | 'triton' for the fused norm/RoPE kernels.

        backend 'onnxruntime' | 'aoti' | 'tensorrt' runs the graphs of `engine_dir` instead (size
        (W, H) and frame_num select one of its profiles; path, if given, must be the checkpoint the
        engines were built from). Such a pipeline is fixed to its profile's size and frame count.
        memory: 'resident' | 'sequential' | 't5_cpu' (see runtime/memory.py); cuda_graphs: capture the
        denoising step as one CUDA graph on CUDA (False to compare). overrides: per-component backends,
        e.g. {"vae": "eager"} with backend="tensorrt" (components: text_encoder, image_encoder, dit, vae).
        lora: [(file, scale), ...] merged into an eager DiT at load (models/lora.py); with a compiled DiT,
        the LoRAs its engine was built with must be exactly these (None: take the engine as built)."""
        from wanrt.runtime.backends import COMPONENTS, Backends, eager, from_engine_dir

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        choice = dict.fromkeys(COMPONENTS, backend) | dict(overrides or {})
        unknown = sorted(set(choice) - set(COMPONENTS))
        if unknown:
            raise InputError(f"unknown component(s) {unknown} in the backend overrides; use {', '.join(COMPONENTS)}")
        parts: dict = {}
        config = tokenizer = target = None
        for kind in sorted(set(choice.values()) - {"eager"}):
            if engine_dir is None:
                raise InputError(f"backend {kind!r} needs an engine dir (--engine_dir)")
            w, h = size if size is not None else (None, None)
            got, config, tokenizer, target = from_engine_dir(
                engine_dir, kind, device, w, h, frame_num, None if path is None else str(path),
                components=[c for c in COMPONENTS if choice[c] == kind], lora=lora)
            parts.update(got)
        eager_parts = [c for c in COMPONENTS if choice[c] == "eager"]
        models = None
        if eager_parts:
            from wanrt.models.loading import load

            if path is None:
                raise InputError("a checkpoint path (or 'tiny') is needed for the eager backend")
            if dtype is None:
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            load_device = "cpu" if memory != "resident" else device  # offloaded models never all sit on the GPU
            models = load(path, device=load_device, dtype=dtype if dtype != torch.float32 else None,
                          components=eager_parts, lora=lora if "dit" in eager_parts else None)
            if memory != "resident" and models.dit is not None:
                models.dit.to(device)
            ours = eager(models)
            parts.update({c: getattr(ours, c) for c in eager_parts})
            config = config or models.config
            tokenizer = tokenizer or (models.text_encoder.tokenizer if models.text_encoder else None)
        if tokenizer is None:
            from wanrt.models.loading import Checkpoint

            tokenizer = Checkpoint(path).tokenizer()
        modules = {} if models is None else ours.modules
        backends = Backends(parts["text_encoder"], parts["image_encoder"], parts["dit"], parts["vae"],
                            names=choice, modules=modules)
        pipe = cls(backends, config, tokenizer, device, attention=attention, kernels=kernels, target=target,
                   memory=memory, cuda_graphs=cuda_graphs)
        from wanrt.models import tiny

        if path is not None and tiny.is_builtin(path):
            pipe.defaults = (tiny.BUILTIN_FRAMES, tiny.BUILTIN_SIZE[0] * tiny.BUILTIN_SIZE[1])
        return pipe

    # -- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 512, text_dim); each distinct text is encoded once and kept in an LRU cache."""
        from wanrt.models.t5 import clean_prompt

        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            enc = self.tokenizer([clean_prompt(p) for p in missing], padding="max_length", truncation=True,
                                 max_length=self.config.t5.text_len, add_special_tokens=True, return_tensors="pt")
            where = self.memory.input_device("text_encoder")
            out = self.backends.text_encoder(enc["input_ids"].to(where), enc["attention_mask"].to(where))
            for p, row in zip(missing, out.to(self.device)):
                self._text_cache[p] = row
        for p in prompts:
            self._text_cache.move_to_end(p)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    def encode_image(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """CLIP tokens of both original-resolution frames -> (1, 2 * tokens, clip_dim)."""
        c = self.config.clip
        frames = [F.interpolate(f[None].float().to(self.device), size=(c.image_size, c.image_size),
                                mode="bicubic", align_corners=False) for f in (first, last)]
        x = torch.cat(frames)
        mean = torch.tensor(c.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(c.std, device=self.device).view(1, 3, 1, 1)
        feats = self.backends.image_encoder((x * 0.5 + 0.5 - mean) / std)  # (2, tokens, clip_dim)
        return feats.reshape(1, -1, feats.shape[-1])

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """(1, 3, F, H, W) -> normalised latent (1, 16, T_lat, H/8, W/8), chunked 1, 4, 4, ..."""
        from wanrt.models.vae import encode_chunks

        return encode_chunks(self.backends.vae.encode_chunk, video.to(self.device))

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        from wanrt.models.vae import decode_chunks

        return decode_chunks(self.backends.vae.decode_chunk, z)

    # -- request ------------------------------------------------------------------------------------

    def __call__(self, first_frame, last_frame, prompt: str, **kwargs) -> Video:
        """Generate a video; see `generate` for the arguments. Requests are serialized per pipeline."""
        from wanrt.kernels import attention, fused

        with self._lock, torch.no_grad(), attention.use(self.attention), fused.use(self.kernels):
            return self.generate(first_frame, last_frame, prompt, **kwargs)

    def generate(self, first_frame, last_frame, prompt: str, *, negative_prompt: str | None = None,
                 max_area: int | None = None, frame_num: int | None = None, sample_steps: int = 50,
                 sample_shift: float = 16.0, guide_scale: float = 5.0, sample_solver: str = "unipc",
                 seed: int = 0, progress: bool = True, decode: bool = True, cancel: threading.Event | None = None,
                 timesteps=None) -> Video:
        """max_area default 1280*720, frame_num default 81 (an engine pipeline: its profile's; the built-in
        tiny models: 64*64, 17).
        sample_solver 'unipc' | 'dpm++' | 'euler'; timesteps: an explicit descending list in (0, 1000]
        (e.g. [1000, 750, 500, 250] for 4-step distilled LoRAs) replacing the solver's grid of sample_steps.
        guide_scale 1.0 is CFG-free: one batch-1 DiT call per step on the conditional branch, the negative
        prompt is not encoded (a compiled DiT must be built with batch 1 for it, and batch 2 otherwise).
        decode=False skips the VAE decode (multi-process runs decode on rank 0 only); `cancel`, when
        set, stops the request between two denoising steps (raises runtime.step.Cancelled)."""
        notes: list[str] = []
        frame_num, max_area = self._resolve_target(frame_num, max_area)
        validate(self.config, frame_num, sample_steps, guide_scale, max_area, sample_solver, timesteps)
        cfg_free = guide_scale == 1.0  # uncond + 1 * (cond - uncond) = cond: the uncond branch is never needed
        batch = getattr(self.target, "batch", None)
        if batch == 2 and cfg_free:
            raise InputError("guidance 1.0 runs the DiT on the conditional branch only (batch 1), but this engine's "
                             "DiT was built for batch 2 (CFG); build one with --batch 1, or use guidance != 1.0")
        if batch == 1 and not cfg_free:
            raise InputError(f"guidance {guide_scale} needs CFG (a batch-2 DiT), but this engine's DiT was built "
                             "with --batch 1 for guidance 1.0; use --sample_guide_scale 1.0 or a batch-2 engine")
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        first, last = load_image(first_frame), load_image(last_frame)
        last = match_last_frame(first, last)
        if self.target is not None:
            first, last, note = crop_to_aspect(first, last, self.target.width, self.target.height)
            if note:
                notes.append(note)
            lat_h, lat_w = self.target.height // 8, self.target.width // 8
        else:
            lat_h, lat_w = target_size(first.shape[1], first.shape[2], max_area)
        if lat_h < 2 or lat_w < 2:
            raise InputError(f"max_area {max_area} is too small for a {first.shape[2]}x{first.shape[1]} frame")
        patch = self.config.dit.patch_size
        if max(lat_h // patch[1], lat_w // patch[2]) > self.config.dit.rope_max_len:
            raise InputError(f"size {lat_w * 8}x{lat_h * 8} exceeds the model's RoPE table "
                             f"({self.config.dit.rope_max_len * 16} px per side)")
        height, width = lat_h * 8, lat_w * 8
        t_lat = (frame_num - 1) // 4 + 1

        stage = self.memory.stage
        t0 = time.perf_counter()
        neg = negative_prompt or FLF2V_NEG_PROMPT
        with stage("text_encoder"):
            # (2, 512, text_dim): cond, uncond; CFG-free: (1, 512, text_dim), the negative prompt unused
            context = self.encode_text([prompt] if cfg_free else [prompt, neg])
        timings["text_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with stage("image_encoder"):
            clip_fea = self.encode_image(first, last)
        timings["image_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with stage("vae_encode"):
            y = torch.cat([flf2v_mask(frame_num, lat_h, lat_w)[None].to(self.device),
                           self.vae_encode(conditioning_video(first, last, frame_num, height, width))], dim=1)
        timings["vae_encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((16, t_lat, lat_h, lat_w), generator=gen, dtype=torch.float32, device=self.device)
        with stage("denoise"):
            latent = self.denoise(noise[None], context, clip_fea, y, sample_steps=sample_steps,
                                  sample_shift=sample_shift, guide_scale=guide_scale, sample_solver=sample_solver,
                                  progress=progress, cancel=cancel, timesteps=timesteps)
        timings["denoise"] = time.perf_counter() - t0

        if not decode:  # multi-process runs: rank 0 decodes, the others return no frames
            timings["total"] = time.perf_counter() - t_start
            return Video(frames=np.zeros((0, height, width, 3), np.uint8), fps=FPS, timings=timings, seed=seed)
        t0 = time.perf_counter()
        with stage("vae_decode"):
            video = self.vae_decode(latent)[0]  # (3, F, H, W)
        timings["vae_decode"] = time.perf_counter() - t0
        frames = to_uint8_frames(video)
        timings["total"] = time.perf_counter() - t_start
        return Video(frames=frames, fps=FPS, timings=timings, seed=seed, notes=notes, memory=dict(self.memory.peaks),
                     backends=dict(self.backends.names))

    def _resolve_target(self, frame_num: int | None, max_area: int | None) -> tuple[int, int]:
        if self.target is None:
            return frame_num or self.defaults[0], max_area or self.defaults[1]
        t = self.target
        if frame_num is not None and frame_num != t.frame_num:
            raise InputError(f"the engine was built for {t.frame_num} frames; frame_num {frame_num} contradicts it "
                             "(rebuild the engine for that frame count)")
        if max_area is not None and max_area != t.width * t.height:
            raise InputError(f"the engine was built for {t.width}*{t.height}; size area {max_area} contradicts it")
        return t.frame_num, t.width * t.height

    def denoise(self, latent: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor, *,
                sample_steps: int, sample_shift: float, guide_scale: float, sample_solver: str,
                progress: bool = False, cancel=None, timesteps=None) -> torch.Tensor:
        """The sampling loop: CFG as one batch-2 DiT call per step (a CUDA graph on CUDA), or one batch-1 call
        when context holds only the cond prompt (guidance 1.0). latent (1, 16, T, h, w)."""
        from wanrt.runtime.step import CFGStep

        scheduler = make_scheduler(sample_solver, sample_shift)
        scheduler.set_timesteps(sample_steps, device=self.device, timesteps=timesteps)
        step = CFGStep(self.backends.dit, context, clip_fea, y, guide_scale, scheduler, latent)
        if progress:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task("denoising", total=step.num_steps)
                out = step.run(self.cuda_graphs, cancel, lambda: bar.advance(task))
        else:
            out = step.run(self.cuda_graphs, cancel)
        return out.clone()
