"""Training pieces for the shipped tiny FLF2V model (driven by scripts/train_tiny.py).

What is trained and what is not:
- T5 and CLIP stay the frozen random encoders of `wanrt.models.tiny.write` (seeded). They are
  deterministic feature maps, so the DiT can learn to read them; training them would need real
  text/image data and buys nothing for this toy task.
- The VAE is trained as a (lightly regularised) autoencoder through its real causal chunked path
  (chunk 0 = 1 frame, later chunks 4 frames with caches), with its normalised latents pushed towards
  zero mean / unit variance per channel, because the DiT and the sampler assume latents on that scale
  and the latent mean/std are the fixed official constants, not checkpoint tensors.
- The DiT is trained by flow matching on pre-encoded latents with exactly the inputs the pipeline
  builds (mask + VAE latent of [first, zeros, last], CLIP tokens of both frames, T5 context), and
  prompt dropout to the pipeline's negative prompt, so classifier-free guidance has an unconditional
  branch to work with. Its forward here (`dit_forward_compact`) is the model's own function on a
  compacted text context, ~10x cheaper on a CPU (tested equal to WanDiT.forward).
- Both losses weigh what a viewer looks at: object pixels / latent cells, and the frames that carry the
  given first and last frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wanrt.kernels.fused import norm_modulate
from wanrt.models import vae as vae_module
from wanrt.models.config import DiTConfig, VAEConfig, WanConfig
from wanrt.models.vae import WanVAE, _CacheIO, decode_chunks, encode_chunks
from wanrt.pipeline import conditioning_video, flf2v_mask
from wanrt.schedulers import shift_sigmas

from . import data

# The compact text context the training forward uses (see `compact_context`); every training prompt
# and the negative prompt tokenise to far fewer tokens than this (checked when the data is built).
COMPACT_TEXT_LEN = 96  # the varied clips' prompts name up to three objects (measured max: 92 tokens)

# (frames, width, height, share of DiT batches). 17 x 64x64 is the main task; 9 frames and 64x48
# (the 4:3 shape of the built-in demo frames) are there so the README/demo commands are in-distribution.
GROUPS = ((17, 64, 64, 0.55), (17, 64, 48, 0.15), (9, 64, 64, 0.15), (9, 64, 48, 0.15))

# The second training run (stage `varied`): every size and length the model is asked for (the 4:3, 3:4 and
# 3:2 frames and 9-21 frames), half of the clips the first run's kind, half varied scenes (data.make_scene).
_SIZES = ((64, 64, 0.4), (64, 48, 0.2), (48, 64, 0.15), (96, 64, 0.25))
_LENGTHS = ((17, 0.4), (9, 0.2), (13, 0.2), (21, 0.2))
VARIED_GROUPS = tuple((f, w, h, round(a * b, 4)) for w, h, a in _SIZES for f, b in _LENGTHS)


def varied_clip(seed: int, frames: int, width: int, height: int) -> data.Clip:
    return data.make_scene(seed, frames, width, height) if seed % 2 else data.make_clip(seed, frames, width, height)


# The shipped DiT's depth: trained with 4 blocks (the default below, which also fixes the seeded draw of the
# frozen T5/CLIP in stage base), then grown to 6 (train.grow_dit, `train_tiny.py --dit_layers 6`) and trained on.
SHIPPED_DIT_LAYERS = 6


def trained_config(vae_dim: int = 8, vae_res_blocks: int = 1, dit_layers: int = 4) -> WanConfig:
    """Tiny T5/CLIP (frozen, random) as in WanConfig.tiny(); a wider, deeper DiT that can learn the
    task; the tiny VAE widths. 4 DiT heads, so the 2- and 4-way head splits of the tests still apply."""
    base = WanConfig.tiny()
    dit = DiTConfig(dim=128, ffn_dim=384, freq_dim=64, text_dim=base.t5.dim, num_heads=4, num_layers=dit_layers,
                    clip_dim=base.clip.dim, clip_tokens=base.clip.num_tokens)
    # one residual block per level instead of two: same module types and chunking, half the convs,
    # which is what lets the VAE train in minutes on a CPU (the loader reads the widths from the weights)
    return base.replace(dit=dit, vae=VAEConfig(dim=vae_dim, num_res_blocks=vae_res_blocks))


# ------------------------------------------------------------------------------------------------ VAE


@contextlib.contextmanager
def fast_vae_norm() -> Iterator[None]:
    """Swap the VAE's RMS_norm forward for an equal formula that is ~2x faster on the CPU.

    F.normalize over dim 1 of a (B, C, T, H, W) tensor runs a strided vector-norm kernel that takes a
    third of the tiny VAE's time; sum-of-squares + rsqrt is the same value (to ~1e-6) and vectorises.
    Used only while training and pre-encoding; the shipped model is measured with the real module code.
    """
    original = vae_module.RMS_norm.forward

    def forward(self, x):
        return x * torch.rsqrt(x.square().sum(1, keepdim=True).clamp_min(1e-24)) * (self.scale * self.gamma)

    vae_module.RMS_norm.forward = forward
    try:
        yield
    finally:
        vae_module.RMS_norm.forward = original


def init_vae(vae: WanVAE) -> None:
    """A start that already passes images through, instead of PyTorch's default init.

    With the default init each conv shrinks its input by ~1/sqrt(3) while the biases add constants, so
    after the ~20 convs between pixels and latent every image maps to nearly the same latent (measured:
    across-batch latent std 0.005) and training crawls. Here:
    - 3x3x3 causal convs start as 2D convs on the current frame (the last temporal tap), He-scaled,
      so the first chunk (which sees zero past frames) and later chunks behave alike;
    - the temporal resampling convs start as identities on the current frame (decimation / repeat);
    - the second conv of each residual branch starts small, so every block starts near identity;
    - all biases start at zero.
    """
    import torch.nn as nn

    gen = torch.Generator().manual_seed(0)
    second = {id(m.residual[6]) for m in vae.modules() if isinstance(m, vae_module.ResidualBlock)}
    # the per-frame attention blocks start as identities too (a random global mix blurs every image)
    second |= {id(m.proj) for m in vae.modules() if isinstance(m, vae_module.AttentionBlock)}
    with torch.no_grad():
        for name, m in vae.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
                continue
            w = m.weight
            m.bias.zero_()
            if name.endswith("time_conv"):  # (out, in, 3, 1, 1), out = in or 2 * in
                w.zero_()
                out, inn = w.shape[:2]
                w[:, :, -1, 0, 0] = torch.eye(inn).repeat(out // inn, 1)
                continue
            after_act = isinstance(m, vae_module.CausalConv3d) and w.shape[2] == 3
            gain = 0.2 if id(m) in second else (1.6 if after_act else 1.0)
            if w.dim() == 5 and w.shape[2] == 3:
                w.zero_()
                fan_in = w.shape[1] * w.shape[3] * w.shape[4]
                w[:, :, -1] = torch.randn(w[:, :, -1].shape, generator=gen) * gain / fan_in**0.5
            else:
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) * gain / fan_in**0.5)


def widen_decoder(vae: WanVAE, decoder_dim: int, seed: int = 0) -> WanVAE:
    """A copy of `vae` whose decoder is `decoder_dim` wide at its base (VAEConfig.decoder_dim), decoding exactly
    as the narrow one did (function-preserving widening, Net2Net-style): the encoder, conv2 and so the latent
    space stay, so a DiT trained on these latents stays valid while the decoder gets capacity to fine-tune.

    Every grown channel starts at zero: its producing weights and bias are 0; the weights that read the new
    channels are random (they multiply zeros, so the output does not move, but gradients reach the producers).
    Two rescalings and one mapping keep the old channels' values (to fp32 rounding): RMS_norm multiplies by
    sqrt(C) (so old gammas x sqrt(C_old / C_new)); the single-head attention divides its logits by sqrt(C) (so
    q x sqrt(C_new / C_old)); to_qkv's (q, k, v) and an upsample3d time_conv's (2 frames) output channels are
    chunked, so old channels map chunk by chunk. The new k channels are random too (q's new channels, 0, meet
    them), else q and k stay 0.
    """
    old_cfg = vae.cfg
    old_base = old_cfg.decoder_base_dim
    if decoder_dim <= old_base:
        raise ValueError(f"decoder_dim {decoder_dim} must exceed the decoder's base width {old_base}")
    cfg = dataclasses.replace(old_cfg, decoder_dim=None if decoder_dim == old_cfg.dim else decoder_dim)
    wide = WanVAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    old = vae.state_dict()
    state = {}
    for name, target in wide.state_dict().items():
        src = old[name]
        if src.shape == target.shape:
            state[name] = src.clone()
            continue
        n_out, n_out_new = src.shape[0], target.shape[0]
        chunks = 3 if ".to_qkv." in name else 2 if ".time_conv." in name else 1
        c_old, c_new = n_out // chunks, n_out_new // chunks
        if name.endswith(".gamma"):  # (C, 1, 1[, 1])
            t = torch.ones_like(target)
            t[:n_out] = src * (n_out / n_out_new) ** 0.5
            state[name] = t
            continue
        t = torch.zeros_like(target)
        if src.dim() > 1 and src.shape[1] != target.shape[1]:  # reads new channels: random, x zeros at first
            t[:, src.shape[1]:] = torch.randn(t[:, src.shape[1]:].shape, generator=gen) * float(src.std())
        scale = torch.ones(chunks)
        if chunks == 3:  # (q, k, v): q scaled for the wider attention; new k rows read the old inputs too
            scale[0] = (c_new / c_old) ** 0.5
            if src.dim() > 1:
                k_new = t[c_new + c_old:2 * c_new, :src.shape[1]]
                k_new.copy_(torch.randn(k_new.shape, generator=gen) * float(src.std()))
        for i in range(chunks):
            block = src[i * c_old:(i + 1) * c_old]
            if src.dim() > 1:
                t[i * c_new:i * c_new + c_old, :src.shape[1]] = block * scale[i]
            else:
                t[i * c_new:i * c_new + c_old] = block * scale[i]
        state[name] = t
    wide.load_state_dict(state)
    return wide.train(vae.training)


def vae_encode_train(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """Normalised mu through the real chunked encoder, with gradients (WanVAE.encode is the same math)."""
    z_dim = vae.cfg.z_dim

    def chunk(x, caches):
        io = _CacheIO(caches)
        mu = vae.conv1(vae.encoder(x, io))[:, :z_dim]
        return (mu - vae.mean) * (1.0 / vae.std), io.finish()

    return encode_chunks(chunk, video, vae.cfg.temporal_stride)


def vae_decode_train(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """WanVAE.decode without the final clamp, so pixels outside [-1, 1] still get gradients."""

    def chunk(zc, caches):
        io = _CacheIO(caches)
        return vae.decoder(vae.conv2(zc / (1.0 / vae.std) + vae.mean), io), io.finish()

    return decode_chunks(chunk, z)


def vae_batch(step: int, batch: int, seed: int, crop: int | None = None, object_weight: float = 4.0,
              key_weight: float = 1.0, varied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(video (B, 3, T, H, W) in [-1, 1], pixel weights (B, 1, T, H, W)), deterministic in (step, seed).

    Windows of synthetic clips: T is 1 (the first-chunk path alone: cheap steps), 5 (first chunk + one
    4-frame chunk) or 9 (also chunk-to-chunk caches); frames are 64x64 or 64x48, or a random crop x crop
    window of them (the VAE is convolutional, and a 32x32 step costs a quarter of a 64x64 one). Object
    pixels (known from the clip's background) weigh 1 + object_weight: they are a few percent of the
    frame but all of what the video is about, and a plain mean lets the VAE leave them blurry. Frames 0,
    4, 8 (chunk 0 and the last frame of each 4-frame chunk: where FLF2V's given first and last frame sit)
    weigh key_weight more, since the user compares those to the frames they gave.

    varied: the second run's data instead (every trained size, half of the clips varied scenes)."""
    rng = np.random.default_rng([seed, step])
    t = int(rng.choice([1, 5, 9], p=[0.2, 0.55, 0.25]))
    if varied:
        w, h = _SIZES[int(rng.choice(len(_SIZES), p=[a for _, _, a in _SIZES]))][:2]
    else:
        w, h = (64, 48) if rng.random() < 0.3 else (64, 64)
    make = varied_clip if varied else data.make_clip

    def draw():
        clip = make(int(rng.integers(data.TRAIN_SEEDS.stop)), data.FRAMES, w, h)
        start = int(rng.integers(0, data.FRAMES - t + 1))
        return clip.frames[start:start + t], clip.background

    return _weighted_batch(draw, rng, batch, w, h, crop, object_weight, key_weight)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(..., H, W) bool mask grown by `radius` pixels (square neighbourhood), per frame."""
    h, w = mask.shape[-2:]
    pad = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(radius, radius)] * 2)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= pad[..., dy:dy + h, dx:dx + w]
    return out


def frame_motion(mask: np.ndarray) -> np.ndarray:
    """(F,) float in [0, 2] for an (F, H, W) object mask: the pixels the objects cover or uncover between a
    frame and its faster neighbour, over the objects' area; ~4d / (pi r) for a disk of radius r moving d px,
    2 for a jump clear of itself, 0 for a still frame (or no object). Large for small objects moving fast."""
    area = mask.sum((1, 2)).astype(np.float64)
    change = (mask[1:] ^ mask[:-1]).sum((1, 2)).astype(np.float64)  # between frames t and t + 1
    pad = np.concatenate([[0.0], change, [0.0]])
    both = np.maximum(pad[:-1], pad[1:])  # frame t: the larger of its change from t - 1 and to t + 1
    return np.minimum(both / np.maximum(area, 1.0), 2.0)


def _weighted_batch(draw, rng: np.random.Generator, batch: int, width: int, height: int, crop: int | None,
                    object_weight: float, key_weight: float, last_weight: float = 0.0, halo_weight: float = 0.0,
                    halo: int = 3, motion_weight: float = 0.0, crop_on_object: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` clips from draw() -> (frames, background), each cropped to a random crop x crop window (rng, after
    draw's own draws), and their pixel weights: object pixels 1 + object_weight, the background within `halo`
    pixels of the object 1 + halo_weight (where a blurry decoder paints object-background blends, which read as
    part of the object in a wrong colour), frames 0, 4, 8, ... times 1 + key_weight, the last frame times
    1 + last_weight more, and every frame times 1 + motion_weight * motion(frame)^2 (`frame_motion`: fast, small
    objects, which one 4-frame latent chunk must place four times and a decoder smears). crop_on_object: the
    window is centred (+- crop / 4) on the objects of one frame drawn by its motion, so it holds the fast part
    of the path, which a random window of a quarter of the frame mostly misses."""
    vids, masks, rings, motions = [], [], [], []
    for _ in range(batch):
        v, background = draw()
        m = data.object_mask(v, background, threshold=8)
        r = dilate(m, halo) & ~m if halo_weight else np.zeros_like(m)
        motions.append(frame_motion(m))  # on the whole frame: a crop may cut the object
        if crop:
            if crop_on_object and m.any():
                p = motions[-1] + 0.05 * m.any((1, 2))  # every frame with an object, fast ones far more often
                i = int(rng.choice(len(m), p=p / p.sum()))
                ys, xs = np.nonzero(m[i]) if m[i].any() else np.nonzero(m.any(0))
                cy, cx = ys.mean() + rng.uniform(-crop / 4, crop / 4), xs.mean() + rng.uniform(-crop / 4, crop / 4)
                y0 = int(np.clip(round(cy - crop / 2), 0, height - crop))
                x0 = int(np.clip(round(cx - crop / 2), 0, width - crop))
            else:
                y0, x0 = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
            v, m, r = (a[:, y0:y0 + crop, x0:x0 + crop] for a in (v, m, r))
        vids.append(v)
        masks.append(m)
        rings.append(r)
    weight = (1.0 + object_weight * torch.from_numpy(np.stack(masks)).float()[:, None]
              + halo_weight * torch.from_numpy(np.stack(rings)).float()[:, None])
    weight *= 1.0 + motion_weight * torch.from_numpy(np.stack(motions)).float()[:, None, :, None, None].square()
    weight[:, :, ::4] *= 1.0 + key_weight
    weight[:, :, -1] *= 1.0 + last_weight
    return frames_to_tensor(np.ascontiguousarray(np.stack(vids))), weight


def vae_clip_batch(step: int, batch: int, seed: int, crop: int | None = None, object_weight: float = 4.0,
                   key_weight: float = 1.0, last_weight: float = 2.0, halo_weight: float = 0.0,
                   motion_weight: float = 0.0, hop_fraction: float = 0.0, crop_on_object: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `vae_batch` (varied), but whole clips of 9, 13, 17 or 21 frames from their first frame: the
    pipeline decodes a generated clip in one pass of 1 + 4k frames, so its last frame comes out after up
    to five cached chunks, a path `vae_batch`'s windows of at most 9 frames never train. The clip's last
    frame (the user's given last frame) weighs `last_weight` more on top of the key frames' weight.
    hop_fraction: that share of the clips is one object in a hop (data.make_clip, curved), the fastest and
    most accelerating motion there is, which otherwise is ~1 clip in 5 (half the draws are single objects,
    40% of those hop); crop_on_object: see `_weighted_batch`."""
    rng = np.random.default_rng([seed, 3, step])
    t = int(rng.choice([9, 13, 17, 21], p=[0.15, 0.2, 0.4, 0.25]))
    w, h = _SIZES[int(rng.choice(len(_SIZES), p=[a for _, _, a in _SIZES]))][:2]

    def draw():
        if hop_fraction and rng.random() < hop_fraction:
            for _ in range(64):  # a hop needs room: narrow frames make one rarely (then the last clip drawn)
                clip = data.make_clip(2 * int(rng.integers(data.TRAIN_SEEDS.stop // 2)), t, w, h)
                if clip.curved:
                    break
        else:
            clip = varied_clip(int(rng.integers(data.TRAIN_SEEDS.stop)), t, w, h)
        return clip.frames, clip.background

    return _weighted_batch(draw, rng, batch, w, h, crop, object_weight, key_weight, last_weight, halo_weight,
                           motion_weight=motion_weight, crop_on_object=crop_on_object)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) float in [-1, 1], the pipeline's load_image scaling."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(255).sub(0.5).div(0.5)


@dataclass
class VAELoss:
    total: torch.Tensor
    recon: float
    psnr: float
    moments: float


def vae_loss(vae: WanVAE, video: torch.Tensor, weight: torch.Tensor | None = None, latent_noise: float = 0.1,
             moment_weight: float = 0.05, train_encoder: bool = True, colour_weight: float = 0.0) -> VAELoss:
    """train_encoder=False: the encoder is frozen (no gradients, no moment term), so latents encoded
    before (and a DiT trained on them) stay valid while the decoder trains. colour_weight: a term on the
    error's mean over 4x4-pixel cells (weighted like the pixels), i.e. a local tint: the held-out colour check
    (evaluate.object_checks) reads an object's MEAN colour, which a per-pixel loss lets a decoder trade against
    the object's edges (a small fast disk comes out evenly desaturated)."""
    with contextlib.nullcontext() if train_encoder else torch.no_grad():
        z = vae_encode_train(vae, video)
    if not train_encoder:
        moment_weight = 0.0
    # Noise on the latent: the decoder must tolerate the DiT's imperfect latents, and it keeps the
    # encoder from hiding information in tiny latent differences.
    zn = z + latent_noise * torch.randn_like(z)
    out = vae_decode_train(vae, zn)
    w = torch.ones_like(video[:, :1]) if weight is None else weight
    err = out - video
    recon = ((w * err.square()).mean() + 0.5 * (w * err.abs()).mean()) / w.mean()
    if colour_weight:
        cell = (1, 4, 4)  # every trained size (crops of 32, frames of 48/64/96) is a multiple of 4
        e, wc = F.avg_pool3d(err, cell), F.avg_pool3d(w.expand_as(err[:, :1]), cell)
        recon = recon + colour_weight * (wc * e.square()).mean() / wc.mean()
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # per latent channel
    moments = flat.mean(1).square().mean() + (flat.var(1) - 1.0).square().mean()
    with torch.no_grad():
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(out.clamp(-1, 1), video).item(), 1e-12))  # range 2
    return VAELoss(recon + moment_weight * moments, recon.item(), psnr, moments.item())


# --------------------------------------------------------------------------------------- DiT data


@dataclass
class LatentSet:
    """Everything the DiT sees for N clips of one (frames, width, height) group, pre-encoded."""

    x0: torch.Tensor  # (N, 16, T, h, w) normalised latent of the clip
    y: torch.Tensor  # (N, 20, T, h, w) mask + latent of [first, zeros, last]
    clip: torch.Tensor  # (N, 2 * tokens, clip_dim) CLIP tokens of first and last frame
    prompt: torch.Tensor  # (N,) int64 index into the prompt table
    objects: torch.Tensor  # (N, T, h, w) bool: latent cells the object touches (see latent_object_mask)


def latent_object_mask(clip: data.Clip, stride: int = 8) -> torch.Tensor:
    """(T_lat, H/8, W/8) bool: latent cells whose pixels (in their 1- or 4-frame chunk) show the object,
    grown by one cell because the VAE's receptive field spreads an object into its neighbours."""
    m = torch.from_numpy(data.object_mask(clip.frames, clip.background, threshold=8)).float()  # (F, H, W)
    chunks = [m[:1]] + [m[1 + 4 * i:5 + 4 * i] for i in range((len(m) - 1) // 4)]
    lat = torch.stack([c.amax(0) for c in chunks])[:, None]  # (T, 1, H, W)
    lat = F.max_pool2d(lat, stride)
    return F.max_pool2d(lat, 3, stride=1, padding=1)[:, 0] > 0


@torch.no_grad()
def encode_group(pipe, seeds, frames: int, width: int, height: int, prompt_index: dict[str, int],
                 batch: int = 16, make=data.make_clip) -> LatentSet:
    """Pre-encode clips exactly as FLF2VPipeline.generate builds its inputs (same helpers)."""
    x0s, ys, clips, prompts, objects = [], [], [], [], []
    lat_h, lat_w = height // 8, width // 8
    mask = flf2v_mask(frames, lat_h, lat_w)[None]
    for lo in range(0, len(seeds), batch):
        cs = [make(s, frames, width, height) for s in seeds[lo:lo + batch]]
        video = frames_to_tensor(np.stack([c.frames for c in cs]))
        x0s.append(pipe.vae_encode(video))
        cond = torch.cat([conditioning_video(v[:, 0], v[:, -1], frames, height, width) for v in video])
        ys.append(torch.cat([mask.expand(len(cs), -1, -1, -1, -1), pipe.vae_encode(cond)], dim=1))
        clips.append(torch.cat([pipe.encode_image(v[:, 0], v[:, -1]) for v in video]))
        prompts += [prompt_index[c.prompt] for c in cs]
        objects += [latent_object_mask(c) for c in cs]
    return LatentSet(torch.cat(x0s), torch.cat(ys), torch.cat(clips), torch.tensor(prompts), torch.stack(objects))


def group_prompts(seeds, frames: int, width: int, height: int, make=data.make_clip) -> list[str]:
    return [make(s, frames, width, height).prompt for s in seeds]


@torch.no_grad()
def compact_context(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 contexts as (P, COMPACT_TEXT_LEN, text_dim) plus a per-key log-multiplicity (P, COMPACT_TEXT_LEN).

    The pipeline feeds the DiT 512 text rows, of which all after the prompt's tokens are exactly zero
    and therefore give identical keys and values. Attention over n identical keys equals attention over
    one of them with log(n) added to its logit, so we keep the real rows plus a few zero rows whose
    logits carry log((512 - L) / zero_rows). Same result, ~10x less work per training step.
    """
    out, bias = [], []
    text_len = pipe.config.t5.text_len
    for lo in range(0, len(prompts), 8):
        ctx = pipe.encode_text(prompts[lo:lo + 8])  # (b, 512, C)
        for row in ctx:
            n = int((row.abs().sum(-1) > 0).nonzero().max()) + 1 if row.abs().sum() > 0 else 0
            if n >= COMPACT_TEXT_LEN:
                raise ValueError(f"a prompt has {n} tokens; raise COMPACT_TEXT_LEN ({COMPACT_TEXT_LEN})")
            c = torch.zeros(COMPACT_TEXT_LEN, row.shape[-1])
            c[:n] = row[:n]
            b = torch.zeros(COMPACT_TEXT_LEN)
            b[n:] = math.log((text_len - n) / (COMPACT_TEXT_LEN - n))
            out.append(c)
            bias.append(b)
    return torch.stack(out), torch.stack(bias)


# ------------------------------------------------------------------------------------ DiT forward


def _cross_attention(attn, x, context_img, context_txt, txt_bias):
    """WanI2VCrossAttention.forward with the compact text context (additive key bias on the text part)."""
    b, n, d = x.shape[0], attn.num_heads, attn.head_dim
    q = attn.norm_q(attn.q(x)).view(b, -1, n, d).transpose(1, 2)
    k = attn.norm_k(attn.k(context_txt)).view(b, -1, n, d).transpose(1, 2)
    v = attn.v(context_txt).view(b, -1, n, d).transpose(1, 2)
    k_img = attn.norm_k_img(attn.k_img(context_img)).view(b, -1, n, d).transpose(1, 2)
    v_img = attn.v_img(context_img).view(b, -1, n, d).transpose(1, 2)
    img_x = F.scaled_dot_product_attention(q, k_img, v_img)
    txt_x = F.scaled_dot_product_attention(q, k, v, attn_mask=txt_bias[:, None, None, :])
    return attn.o((txt_x + img_x).transpose(1, 2).flatten(2))


def dit_forward_compact(dit, x, t, context, txt_bias, clip_fea, y, rope):
    """WanDiT.forward where the 512-row text context is given in compact form (see compact_context).
    Numerically the same function as the model's forward on the full context (tested)."""
    f, h, w = dit.grid(x)
    e, e0 = dit.embed_time(t)
    context_img, context_txt = dit.img_emb(clip_fea), dit.text_embedding(context)
    tokens = dit.patchify(x, y)
    for blk in dit.blocks:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (blk.modulation + e0).chunk(6, dim=1)
        tokens = tokens + blk.self_attn(norm_modulate(tokens, shift_sa, scale_sa, blk.norm1.eps), rope) * gate_sa
        tokens = tokens + _cross_attention(blk.cross_attn, blk.norm3(tokens), context_img, context_txt, txt_bias)
        tokens = tokens + blk.ffn(norm_modulate(tokens, shift_ff, scale_ff, blk.norm2.eps)) * gate_ff
    return dit.unpatchify(dit.head(tokens, e), f, h, w).float()


def object_mean_loss(x0_pred: torch.Tensor, x0: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """(B,) the object's colour term: per latent frame that shows the object, the mean latent over its cells
    (per channel) predicted vs true, squared, averaged over those frames and the channels. A shift of the
    object's colour moves this mean; an error that only moves latent values around inside the object (its
    shape, its edge) does not. x0_pred, x0: (B, C, T, h, w); objects: (B, T, h, w) bool."""
    m = objects[:, None].to(x0.dtype)  # (B, 1, T, h, w)
    cells = m.sum((3, 4))  # (B, 1, T)
    mean_err = ((x0_pred - x0) * m).sum((3, 4)) / cells.clamp(min=1)  # (B, C, T)
    shown = (cells > 0).to(x0.dtype)
    return (mean_err.square() * shown).sum((1, 2)) / (shown.sum((1, 2)) * x0.shape[1]).clamp(min=1)


def sample_sigmas(batch: int, gen: torch.Generator, shift: float = 16.0, low: float = 0.2) -> torch.Tensor:
    """Half the batch from the inference distribution (uniform grid shifted by 16: mostly sigma > 0.8,
    where 4-10 step sampling spends every step), half uniform in (low, 1) so the lower-noise end that the
    50-step schedule reaches (its last model call is at sigma ~0.25) is learned as well; no schedule with
    shift 16 ever calls the model below that, so training there would be wasted."""
    u = torch.rand(batch, generator=gen)
    s = shift_sigmas(u, shift)
    uniform = torch.rand(batch, generator=gen) < 0.5
    return torch.where(uniform, low + (1 - low) * u, s).clamp(1e-3, 0.999)


def merge_latents(files: list[dict]) -> dict:
    """Several pre-encoded latent sets (scripts/train_tiny.py's varied_latents.pt, each {prompts, context, bias,
    groups}) as one: each (frames, width, height) group's clips concatenated, the prompt tables united (a
    prompt in several files is kept once) with the negative prompt, every file's last row, last again."""
    neg = files[0]["prompts"][-1]
    if any(f["prompts"][-1] != neg for f in files):
        raise ValueError("latent files end in different negative prompts: they were encoded for different models")
    prompts, rows, index = [], [], {}
    for fi, f in enumerate(files):
        for i, prompt in enumerate(f["prompts"][:-1]):
            if prompt not in index:
                index[prompt] = len(prompts)
                prompts.append(prompt)
                rows.append((fi, i))
    prompts.append(neg)
    rows.append((0, len(files[0]["prompts"]) - 1))
    context = torch.stack([files[fi]["context"][i] for fi, i in rows])
    bias = torch.stack([files[fi]["bias"][i] for fi, i in rows])
    groups: dict = {}
    for f in files:
        remap = torch.tensor([index.get(p, len(prompts) - 1) for p in f["prompts"]])
        for key, g in f["groups"].items():
            g = {**g, "prompt": remap[g["prompt"]]}
            if key in groups:
                groups[key] = {k: torch.cat([groups[key][k], g[k]]) for k in g}
            else:
                groups[key] = g
    return {"prompts": prompts, "context": context, "bias": bias, "groups": groups}


def soup(states: list[dict[str, torch.Tensor]], weights: list[float], names: list[str] | None = None
         ) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts of one model (a "model soup": runs fine-tuned from one start stay in
    one basin, and their mean averages part of each run's error away), computed in fp32, weights normalised."""
    names = names or [f"state {i}" for i in range(len(states))]
    if not states or len(weights) != len(states) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"soup needs one non-negative weight per model ({len(states)}) with a positive sum, "
                         f"got {list(weights)}")
    ref = states[0]
    for name, st in zip(names, states):
        if set(st) != set(ref) or any(st[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"{name} is not a model of the same config as {names[0]}: a soup averages runs of "
                             "one model")
    total = float(sum(weights))
    return {k: sum(w / total * st[k].float() for w, st in zip(weights, states)).to(ref[k].dtype) for k in ref}


def dit_depth(state: dict[str, torch.Tensor]) -> int:
    """The number of blocks of a DiT state dict (blocks.N.*)."""
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def grow_dit(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A trained DiT with `num_layers` blocks that computes exactly the same function as `state`.

    The old blocks keep their order, spread evenly over the new depth (4 -> 6: new blocks after old blocks 1
    and 3); each new block is a copy of the old block before it with the three projections that write into
    the residual stream (self_attn.o, cross_attn.o, ffn.2) zeroed, so it adds nothing until training moves
    those (their gradients are not zero: the copied q/k/v/ffn.0 produce non-zero inputs to them). Capacity
    grows without throwing away what the smaller DiT learned, as in "Net2Net" (Chen et al., 2016).
    """
    old = dit_depth(state)
    if num_layers < old:
        raise ValueError(f"cannot grow a {old}-block DiT to {num_layers} blocks: pick --dit_layers >= {old}")
    where = [i * num_layers // old for i in range(old)]  # new index of each old block
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    source = 0
    for j in range(num_layers):
        if j in where:
            source = where.index(j)
        for k, v in state.items():
            if k.startswith(f"blocks.{source}."):
                rest = k[len(f"blocks.{source}."):]
                zero = j not in where and rest.rsplit(".", 1)[0] in ("self_attn.o", "cross_attn.o", "ffn.2")
                out[f"blocks.{j}.{rest}"] = torch.zeros_like(v) if zero else v.clone()
    return out


def init_dit(dit) -> None:
    """Zero the output projection (the usual DiT 'adaLN-zero'-style start: predict 0 velocity)."""
    with torch.no_grad():
        dit.head.head.weight.zero_()
        dit.head.head.bias.zero_()


class EMA:
    """Exponential moving average of the parameters (with the usual 1 - 1/(10 + step) warm-up)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))
