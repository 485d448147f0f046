"""Analytic FLOP counts per component, from the config and the video size alone.

Convention: 2 FLOPs per multiply-add, matrix multiplications and convolutions only (norms, softmax,
activations, RoPE and residual adds are a few percent at most and are left out, as the usual
"model FLOPs" figures do). An attention over Lq queries and Lk keys of width C costs 4 * Lq * Lk * C
(QK^T and PV, each 2 * Lq * Lk * C), summed over heads.

The DiT count for the 14B model at 1280*720x81 (75,600 tokens) is ~6.55 PFLOP per batch-1 forward:
self-attention 4.68, linears 1.49, cross-attention q/o 0.32 and attention 0.06 (see the spec,
section 11); a CFG step is the batch-2 forward, twice that. The VAE is counted by running its chunk
functions on shape-only (meta) tensors under torch's FlopCounterMode, because the causal 3D conv
stack's per-layer shapes are exactly what the module code computes; T5, CLIP and the DiT are formulas.
"""

from __future__ import annotations

import math

from wanrt.models.config import CLIPConfig, DiTConfig, T5Config, VAEConfig, WanConfig

IMAGE_FRAMES = 2  # FLF2V encodes the first and the last frame with CLIP


def _dit_cfg(config: WanConfig | DiTConfig) -> DiTConfig:
    return config.dit if isinstance(config, WanConfig) else config


def latent_shape(height: int, width: int, frame_num: int, temporal_stride: int = 4, spatial_stride: int = 8
                 ) -> tuple[int, int, int]:
    """(T_lat, h, w) of the VAE latent for a height x width video of frame_num (4n+1) frames."""
    return (frame_num - 1) // temporal_stride + 1, height // spatial_stride, width // spatial_stride


def dit_tokens(config: WanConfig | DiTConfig, height: int, width: int, frame_num: int) -> int:
    """Self-attention sequence length: latent frames x (h / 2) x (w / 2) patches (75,600 at 1280*720x81)."""
    d = _dit_cfg(config)
    t, h, w = latent_shape(height, width, frame_num)
    pt, ph, pw = d.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def dit_forward_breakdown(config: WanConfig | DiTConfig, height: int, width: int, frame_num: int, batch: int = 1
                          ) -> dict[str, int]:
    """FLOPs of one DiT forward by part (all summed over the layers and multiplied by batch).

    linears: self-attention q/k/v/o and the FFN, 2 * L * (4 * dim^2 + 2 * dim * ffn) per layer;
    self_attention: 4 * L^2 * dim per layer; cross_linears: q/o on the L video tokens and k/v over the
    512 text + 2 x 257 image tokens; cross_attention: 4 * L * (512 + 514) * dim per layer;
    embeddings: patch Conv3d, text and image MLPs, time MLPs; head: the final projection.
    """
    d = _dit_cfg(config)
    n = dit_tokens(d, height, width, frame_num)
    dim, ffn, layers = d.dim, d.ffn_dim, d.num_layers
    n_txt, n_img = d.text_len, 2 * d.clip_tokens
    patch = math.prod(d.patch_size)
    parts = {
        "linears": layers * 2 * n * (4 * dim * dim + 2 * dim * ffn),
        "self_attention": layers * 4 * n * n * dim,
        "cross_linears": layers * 2 * (2 * n * dim * dim + 2 * (n_txt + n_img) * dim * dim),
        "cross_attention": layers * 4 * n * (n_txt + n_img) * dim,
        "embeddings": 2 * (n * d.in_dim * patch * dim  # patch embedding (a strided conv = a matmul per patch)
                           + n_txt * (d.text_dim * dim + dim * dim)  # text MLP
                           + n_img * (d.clip_dim * d.clip_dim + d.clip_dim * dim)  # image MLP
                           + d.freq_dim * dim + dim * dim + dim * 6 * dim),  # time embedding + projection
        "head": 2 * n * dim * patch * d.out_dim,
    }
    return {k: v * batch for k, v in parts.items()}


def dit_forward_flops(config: WanConfig | DiTConfig, height: int, width: int, frame_num: int, batch: int = 1) -> int:
    """FLOPs of one DiT forward on `batch` samples at height x width x frame_num (a CFG step: batch=2)."""
    return sum(dit_forward_breakdown(config, height, width, frame_num, batch).values())


def t5_flops(config: WanConfig | T5Config, batch: int = 1) -> int:
    """UMT5 encoder over text_len (512) tokens: q/k/v/o, attention and the gated FFN (3 matmuls) per layer."""
    t = config.t5 if isinstance(config, WanConfig) else config
    n = t.text_len
    per_layer = 2 * n * (4 * t.dim * t.dim_attn + 3 * t.dim * t.dim_ffn) + 4 * n * n * t.dim_attn
    return batch * t.num_layers * per_layer


def clip_flops(config: WanConfig | CLIPConfig, images: int = IMAGE_FRAMES) -> int:
    """The ViT image tower over `images` frames: patch conv and the num_layers - 1 blocks that are run."""
    c = config.clip if isinstance(config, WanConfig) else config
    n, dim = c.num_tokens, c.dim
    patches = 2 * (n - 1) * 3 * c.patch_size**2 * dim
    per_layer = 2 * n * (4 * dim * dim + 2 * dim * c.mlp_dim) + 4 * n * n * dim
    return images * (patches + (c.num_layers - 1) * per_layer)


def _count(fn, *args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _meta_vae(config: WanConfig | VAEConfig):
    import torch

    from wanrt.models.vae import WanVAE

    cfg = config.vae if isinstance(config, WanConfig) else config
    with torch.device("meta"):
        return WanVAE(cfg)


def vae_encode_flops(config: WanConfig | VAEConfig, height: int, width: int, frame_num: int) -> int:
    """The chunked encode of a frame_num-frame video: the 1-frame first chunk plus (F - 1) / 4 4-frame chunks."""
    import torch

    vae = _meta_vae(config)
    stride = vae.cfg.temporal_stride
    first = _count(vae.encode_chunk, torch.empty(1, 3, 1, height, width, device="meta"), None)
    caches = [torch.empty(s, device="meta") for s in vae.encoder_cache_shapes(1, height, width)]
    later = _count(vae.encode_chunk, torch.empty(1, 3, stride, height, width, device="meta"), caches)
    return first + (frame_num - 1) // stride * later


def vae_decode_flops(config: WanConfig | VAEConfig, height: int, width: int, frame_num: int) -> int:
    """The chunked decode of the latent of a frame_num-frame video: one latent frame per chunk."""
    import torch

    vae = _meta_vae(config)
    t, h, w = latent_shape(height, width, frame_num, vae.cfg.temporal_stride, vae.cfg.spatial_stride)
    z = torch.empty(1, vae.cfg.z_dim, 1, h, w, device="meta")
    first = _count(vae.decode_chunk, z, None)
    caches = [torch.empty(s, device="meta") for s in vae.decoder_cache_shapes(1, height, width)]
    later = _count(vae.decode_chunk, z, caches)
    return first + (t - 1) * later


def cfg_step_flops(config: WanConfig | DiTConfig, height: int, width: int, frame_num: int) -> int:
    """One denoising step: the batch-2 (cond, uncond) DiT forward; guidance and scheduler are elementwise."""
    return dit_forward_flops(config, height, width, frame_num, batch=2)


def e2e_flops(config: WanConfig, height: int, width: int, frame_num: int, sample_steps: int) -> int:
    """A whole request: T5 on prompt + negative prompt, CLIP on two frames, VAE encode, the steps, VAE decode."""
    return (t5_flops(config, batch=2) + clip_flops(config) + vae_encode_flops(config, height, width, frame_num)
            + sample_steps * cfg_step_flops(config, height, width, frame_num)
            + vae_decode_flops(config, height, width, frame_num))


def component_flops(component: str, config: WanConfig, height: int, width: int, frame_num: int,
                    sample_steps: int = 1) -> int:
    """FLOPs of one timed call of a bench component (see wanrt.bench.runner.COMPONENTS)."""
    table = {
        "dit_step": lambda: cfg_step_flops(config, height, width, frame_num),
        "vae_encode": lambda: vae_encode_flops(config, height, width, frame_num),
        "vae_decode": lambda: vae_decode_flops(config, height, width, frame_num),
        "text_encoder": lambda: t5_flops(config, batch=2),
        "image_encoder": lambda: clip_flops(config),
        "e2e": lambda: e2e_flops(config, height, width, frame_num, sample_steps),
    }
    if component not in table:
        raise ValueError(f"no FLOP count for component {component!r}; choose from {', '.join(table)}")
    return table[component]()
