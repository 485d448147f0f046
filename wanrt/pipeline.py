"""FLF2VPipeline: first frame + last frame + prompt -> video, the official procedure (spec section 6).

preprocess (size rule, resize, mask) -> text / image encoders -> VAE encode of [first, zeros, last]
-> denoising loop (one batch-2 DiT call per step for CFG) -> VAE decode. Every model call goes through
the Backend seam (wanrt/runtime/backends.py); this file never knows which backend runs.
"""

from __future__ import annotations

import math
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
from wanrt.video import load_image, to_uint8_frames, write_frames, write_mp4

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
    dit_calls: int = 0  # DiT forward calls of the denoising loop (a batched CFG call counts once)

    def save(self, path: str | Path, exclusive: bool = False) -> Path:
        """Write the video (container from the extension); exclusive: never replace an existing file
        (a taken name gets a `_1`, `_2`... suffix). Returns the path written."""
        return write_mp4(self.frames, path, fps=self.fps, exclusive=exclusive)

    def save_frames(self, folder: str | Path) -> Path:
        """Every frame as a lossless PNG in a new folder (frame_0000.png, ...)."""
        return write_frames(self.frames, folder)

    def default_name(self, task: str = "flf2v-14B") -> str:
        """`flf2v-14B_{W}x{H}_{frames}f_{seed}_{time}.mp4`: the real size, never the requested area."""
        f, h, w = self.frames.shape[:3]
        return f"{task}_{w}x{h}_{f}f_seed{self.seed}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"


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


def fit_last_frame(first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """wanrt's default for a last frame of another size than the first: center-crop it to the first
    frame's aspect ratio, then resize it (bicubic) to the first frame's size; a note says so."""
    (fh, fw), (lh, lw) = first.shape[-2:], last.shape[-2:]
    if (fh, fw) == (lh, lw):
        return last, None
    if lw * fh > lh * fw:  # wider than the first frame: crop the sides
        cw, ch = round(lh * fw / fh), lh
    else:
        cw, ch = lw, round(lw * fh / fw)
    top, left = (lh - ch) // 2, (lw - cw) // 2
    crop = last[..., top:top + ch, left:left + cw]
    fitted = F.interpolate(crop[None].float(), size=(fh, fw), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
    note = (f"the last frame is {lw}x{lh}, the first {fw}x{fh}: the last was center-cropped to {cw}x{ch} and "
            "resized to match (last_frame_fit='official' keeps the official code's cropping instead)")
    return fitted, note


def match_last_frame(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The official handling of a last frame whose size differs from the first: scale factor from the
    sizes, then a center crop whose (W, H) list is read as (h, w) -- no actual resize, so the frame is
    garbled (zero-padded, transposed extent). Only behind last_frame_fit='official', for parity tests."""
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


def validate(cfg: WanConfig | None, frame_num: int, sample_steps: int, guide_scale: float | None, max_area: int,
             sample_solver: str, sample_shift: float | None = 16.0, seed: int = 0, timesteps=None) -> None:
    """Request checks that need no model (cfg=None skips the model's RoPE limit; guide_scale or sample_shift
    None: the checkpoint's default, not checked). NaN or infinite numbers are refused here: they would run to
    the end and give an all-black video."""
    from wanrt.schedulers import SOLVERS, check_timesteps

    for name, value in (("guide scale", guide_scale), ("sample_shift", sample_shift)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
    if sample_shift is not None and sample_shift <= 0:
        raise InputError(f"sample_shift must be > 0 (the official default is 16; 5 for 480p), got {sample_shift}")
    if not 0 <= seed < 2**63:
        raise InputError(f"seed must be in 0 .. 2**63-1 (-1 on the CLI: random), got {seed}")
    if frame_num < 5 or (frame_num - 1) % 4:
        raise InputError(f"frame_num must be 4n+1 and at least 5 (e.g. 81), got {frame_num}")
    if sample_steps < 1:
        raise InputError(f"sample_steps must be >= 1, got {sample_steps}")
    if guide_scale is not None and guide_scale < 0:
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


class NonFiniteError(RuntimeError):
    """A model produced NaN or infinite values: the request is refused rather than saved as a black video."""


def check_finite(x: torch.Tensor, what: str) -> None:
    """One device sync per request (not per step): refuse NaN/inf before anything is decoded or saved."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} holds NaN or infinite values: a checkpoint weight is probably NaN/inf "
                             "(check it with `wanrt doctor --ckpt_dir DIR`), or fp16 overflowed (use --dtype bf16)")


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
        wants = [f for f, on in ((f"attention {attention!r}", attention in ("flash", "sage")),
                                 ("kernels 'triton'", kernels == "triton")) if on]
        why = attention_seam.triton_unavailable(torch.device(device)) if wants else None
        if why:
            raise InputError(f"{' and '.join(wants)} asked for, but {why}; use attention 'sdpa' and kernels 'torch'")
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
                        overrides: dict[str, str] | None = None, precision: str | None = None,
                        fp8_keep: int = 0, lora=None, fuse: bool = True, **load_options) -> FLF2VPipeline:
        """path: official or diffusers folder, or `tiny`. dtype None: the official precision map
        (bf16 matmuls, fp32 islands) on CUDA, fp32 on the CPU. attention: 'sdpa' | 'flash' | 'sage'
        (Triton); kernels: 'torch' | 'triton' for the fused norm/RoPE kernels.

        backend 'onnxruntime' | 'aoti' | 'tensorrt' runs the graphs of `engine_dir` instead (size
        (W, H) and frame_num select one of its profiles; path, if given, must be the checkpoint the
        engines were built from). Such a pipeline is fixed to its profile's size and frame count.
        memory: 'resident' | 'sequential' | 't5_cpu' (see runtime/memory.py); cuda_graphs: capture the
        denoising step as one CUDA graph on CUDA (False to compare). overrides: per-component backends,
        e.g. {"vae": "eager"} with backend="tensorrt" (components: text_encoder, image_encoder, dit, vae).
        precision 'fp8' (eager DiT): the bf16 map with the DiT block GEMMs in FP8 (wanrt.kernels.fp8),
        except the first and last `fp8_keep` blocks; engines carry the precision they were built with.
        lora: [(file, scale), ...] merged into an eager DiT at load (models/lora.py); with a compiled DiT,
        the LoRAs its engine was built with must be exactly these (None: take the engine as built).
        fuse: an eager DiT's q/k/v and cross-attention k/v as one GEMM each, after the LoRA merge and FP8
        quantisation (wanrt.kernels.fusion: the same output, one read of each input; False to compare).
        The backends come from the one assembler, wanrt.runtime.load_backends (`load_options` go to it)."""
        from wanrt.runtime.backends import BackendChoiceError, load_backends

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in (None, "fp8"):
            raise InputError(f"precision must be None (dtype decides) or 'fp8', got {precision!r}")
        if precision == "fp8":
            if (overrides or {}).get("dit", backend) != "eager":
                raise InputError("precision='fp8' quantises the eager DiT; an engine's DiT has the precision it was "
                                 "built with (wanrt build --precision fp8)")
            dtype = dtype or torch.bfloat16  # the bf16 map around the FP8 GEMMs, on the CPU too
            load_options |= {"precision": precision, "fp8_keep": fp8_keep}
        load_options["fuse"] = fuse
        try:
            got = load_backends(path, device, backend=backend, overrides=overrides, engine_dir=engine_dir,
                                size=size, frame_num=frame_num, dtype=dtype, memory=memory, lora=lora,
                                **load_options)
        except BackendChoiceError as e:
            raise InputError(str(e)) from None
        backends, config, tokenizer, target = got.backends, got.config, got.tokenizer, got.target
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
                 sample_shift: float | None = None, guide_scale: float | None = None, sample_solver: str = "unipc",
                 seed: int = 0, progress: bool = True, decode: bool = True, cancel: threading.Event | None = None,
                 last_frame_fit: str = "resize", cache: str = "none", cache_threshold: float | None = None,
                 timesteps=None) -> Video:
        """max_area default 1280*720, frame_num default 81 (an engine pipeline: its profile's; the built-in
        tiny models: 64*64, 17); guide_scale and sample_shift default to the checkpoint's (config.sample:
        the official 5.0 and 16, the trained tiny model 2.0 and 16; an engine dir keeps its checkpoint's).
        sample_solver 'unipc' | 'dpm++' | 'euler'; timesteps: an explicit descending list in (0, 1000]
        (e.g. [1000, 750, 500, 250] for 4-step distilled LoRAs) replacing the solver's grid of sample_steps.
        guide_scale 1.0 is CFG-free: one batch-1 DiT call per step on the conditional branch, the negative
        prompt is not encoded (a compiled DiT must be built with batch 1 for it, and batch 2 otherwise).
        decode=False skips the VAE decode (multi-process runs decode on rank 0 only); `cancel`, when
        set, stops the request between two denoising steps (raises runtime.step.Cancelled).
        last_frame_fit: a last frame of another size than the first is 'resize'd to it (center crop to
        the aspect ratio, then bicubic; default, with a note) or handled as the 'official' code does.
        cache: 'none' (every step calls the DiT) | 'teacache' (steps whose output is predictable reuse the
        last one, see runtime/cache.py); cache_threshold: TeaCache's accumulated-change threshold (None: the
        model's documented default; higher skips more steps)."""
        notes: list[str] = []
        frame_num, max_area = self._resolve_target(frame_num, max_area)
        guide_scale = self.config.sample.guide_scale if guide_scale is None else guide_scale
        sample_shift = self.config.sample.shift if sample_shift is None else sample_shift
        validate(self.config, frame_num, sample_steps, guide_scale, max_area, sample_solver, sample_shift, seed,
                 timesteps=timesteps)
        self._check_cache(cache, cache_threshold)
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
        if last_frame_fit not in ("resize", "official"):
            raise InputError(f"last_frame_fit must be 'resize' or 'official', got {last_frame_fit!r}")
        first, last = load_image(first_frame), load_image(last_frame)
        if last_frame_fit == "official":
            last = match_last_frame(first, last)
        else:
            last, note = fit_last_frame(first, last)
            if note:
                notes.append(note)
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
        stats: dict = {}
        with stage("denoise"):
            latent = self.denoise(noise[None], context, clip_fea, y, sample_steps=sample_steps,
                                  sample_shift=sample_shift, guide_scale=guide_scale, sample_solver=sample_solver,
                                  progress=progress, cancel=cancel, cache=cache, cache_threshold=cache_threshold,
                                  stats=stats, timesteps=timesteps)
        timings["denoise"] = time.perf_counter() - t0
        check_finite(latent, "the denoised latent")

        if not decode:  # multi-process runs: rank 0 decodes, the others return no frames
            timings["total"] = time.perf_counter() - t_start
            return Video(frames=np.zeros((0, height, width, 3), np.uint8), fps=FPS, timings=timings, seed=seed,
                         dit_calls=stats["dit_calls"])
        t0 = time.perf_counter()
        with stage("vae_decode"):
            video = self.vae_decode(latent)[0]  # (3, F, H, W)
        timings["vae_decode"] = time.perf_counter() - t0
        check_finite(video, "the decoded video")
        frames = to_uint8_frames(video)
        timings["total"] = time.perf_counter() - t_start
        return Video(frames=frames, fps=FPS, timings=timings, seed=seed, notes=notes, memory=dict(self.memory.peaks),
                     backends=dict(self.backends.names), dit_calls=stats["dit_calls"])

    def _check_cache(self, cache: str, cache_threshold: float | None) -> None:
        """A step-cache request this pipeline can serve, checked before any work."""
        from wanrt.models.config import teacache_config
        from wanrt.runtime.cache import CacheError, check, require

        try:
            check(cache, cache_threshold)
            if cache == "teacache":
                require(self.backends.dit, teacache_config(self.config.dit))
        except CacheError as e:
            raise InputError(str(e)) from None

    def _resolve_target(self, frame_num: int | None, max_area: int | None) -> tuple[int, int]:
        if self.target is None:  # None means "not given"; 0 is a value (refused by validate)
            return (self.defaults[0] if frame_num is None else frame_num,
                    self.defaults[1] if max_area is None else max_area)
        t = self.target
        if frame_num is not None and frame_num != t.frame_num:
            raise InputError(f"the engine was built for {t.frame_num} frames; frame_num {frame_num} contradicts it "
                             "(rebuild the engine for that frame count)")
        if max_area is not None and max_area != t.width * t.height:
            raise InputError(f"the engine was built for {t.width}*{t.height}; size area {max_area} contradicts it")
        return t.frame_num, t.width * t.height

    def denoise(self, latent: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor, *,
                sample_steps: int, sample_shift: float, guide_scale: float, sample_solver: str,
                progress: bool = False, cancel=None, cache: str = "none", cache_threshold: float | None = None,
                stats: dict | None = None, timesteps=None) -> torch.Tensor:
        """The sampling loop: CFG as one batch-2 DiT call per step (a CUDA graph on CUDA), or one batch-1 call
        when context holds only the cond prompt (guidance 1.0). latent (1, 16, T, h, w).
        cache 'teacache': the steps to compute are decided once here, from the schedule (runtime/cache.py).
        stats, if given, receives dit_calls."""
        from wanrt.runtime.step import CFGStep

        scheduler = make_scheduler(sample_solver, sample_shift)
        scheduler.set_timesteps(sample_steps, device=self.device, timesteps=timesteps)
        plan = None
        if cache == "teacache":
            from wanrt.models.config import teacache_config
            from wanrt.runtime.cache import plan_for

            plan = plan_for(self.backends.dit, teacache_config(self.config.dit), scheduler.timesteps, cache_threshold)
        step = CFGStep(self.backends.dit, context, clip_fea, y, guide_scale, scheduler, latent, cache_plan=plan)
        if progress:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task("denoising", total=step.num_steps)
                out = step.run(self.cuda_graphs, cancel, lambda: bar.advance(task))
        else:
            out = step.run(self.cuda_graphs, cancel)
        if stats is not None:
            stats["dit_calls"] = step.dit_calls
        return out.clone()
