"""The Wan2.1 diffusion transformer (WanModel, model_type='flf2v'), batch-first and fixed-shape.

Module names are the official ones, so official `state_dict`s load with `strict=True`. Differences
from the official forward, all numerically neutral (see tests/test_dit.py):
- inputs are batched tensors, not lists; no padding to `seq_len` (the token count is F*H*W/4);
- RoPE uses precomputed real cos/sin tables instead of complex float64 multiplication;
- the sinusoidal timestep embedding is a table computed once in float64 and gathered by integer t;
- precision is explicit: every matmul casts its input to its weight's dtype (what autocast did), and
  `to_precision(model, torch.bfloat16)` casts the matmul weights while the official fp32 islands
  (time embedding/projection, modulation, norms, head, residual stream) stay fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanrt.kernels.attention import attention
from wanrt.kernels.fused import gelu_tanh, norm_modulate, qk_norm_rope, rms_norm_ref

from .config import DiTConfig

# ---------------------------------------------------------------------------------------------------
# Layers with explicit precision


class Linear(nn.Linear):
    """nn.Linear that casts its input to the weight dtype (autocast made explicit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def input_dtype(self) -> torch.dtype:
        return self.weight.dtype


def matmul_input_dtype(linear: nn.Module) -> torch.dtype | None:
    """The input format `linear` turns whatever it gets into, so the norm feeding it can emit that directly
    (the same numbers, fewer bytes): our casting Linear's weight dtype, an FP8Linear's e4m3 (per-token
    quantised rows, kernels/fp8.QuantizedRows). None for any other module (it takes the fp32 result)."""
    ask = getattr(linear, "input_dtype", None)
    return ask() if callable(ask) else None


class Conv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class WanRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) over the last dim, statistics in fp32, then * weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm with an fp32 result whatever the input dtype (autocast's rule for layer_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


# ---------------------------------------------------------------------------------------------------
# Positional tables (computed once in float64, stored as fp32)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Official `sinusoidal_embedding_1d`: [cos, sin] of positions * 10000^(-j/half).

    The official code computes it in float64; `dtype=torch.float32` is the export-safe variant used
    only for non-integer timesteps (integer timesteps read the float64 table, `WanDiT.time_table`).
    """
    half = dim // 2
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half)).to(dtype)
    sinusoid = positions.to(dtype)[:, None] * inv.to(positions.device)[None, :]
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_angles(max_len: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Official 3-axis RoPE angles (max_len, head_dim // 2) in float64: [t | h | w] frequency blocks."""
    d = head_dim

    def axis(dim: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))
        return torch.outer(torch.arange(max_len, dtype=torch.float64), inv)

    return torch.cat([axis(d - 4 * (d // 6)), axis(2 * (d // 6)), axis(2 * (d // 6))], dim=1)


def rope_grid(cos_table: torch.Tensor, sin_table: torch.Tensor, cfg: DiTConfig, f: int, h: int, w: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos, sin (f*h*w, head_dim/2) from the (max_len, head_dim/2) angle tables: the t, h and
    w frequency blocks indexed by each token's grid position, tokens in (f, h, w) row-major order."""
    ct, ch, cw = cfg.rope_split
    if max(f, h, w) > cfg.rope_max_len:
        raise ValueError(f"token grid {f}x{h}x{w} exceeds the RoPE table ({cfg.rope_max_len} per axis)")

    def grid(table: torch.Tensor) -> torch.Tensor:
        t = table[:f, :ct].view(f, 1, 1, ct).expand(f, h, w, ct)
        hh = table[:h, ct:ct + ch].view(1, h, 1, ch).expand(f, h, w, ch)
        ww = table[:w, ct + ch:ct + ch + cw].view(1, 1, w, cw).expand(f, h, w, cw)
        return torch.cat([t, hh, ww], dim=-1).reshape(f * h * w, ct + ch + cw)

    return grid(cos_table), grid(sin_table)


# ---------------------------------------------------------------------------------------------------
# Blocks


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps)  # over the full width, before the head split
        self.norm_k = WanRMSNorm(dim, eps=eps)

    def input_dtype(self) -> torch.dtype | None:
        """The input format of the q/k/v projection (matmul_input_dtype): the norm before it emits that."""
        return matmul_input_dtype(getattr(self, "qkv_proj", None) or self.q)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Projections, q/k RMSNorm over the full width, RoPE. Returns q, k (fp32), v: (B, L, H, D)."""
        b, s, n, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        if hasattr(self, "qkv_proj"):  # q, k, v as one GEMM: weight [q; k; v] (3 dim, dim), kernels/fusion.py
            q, k, v = self.qkv_proj(x).split(self.dim, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = qk_norm_rope(q, self.norm_q.weight, self.norm_q.eps, *rope, n)
        k = qk_norm_rope(k, self.norm_k.weight, self.norm_k.eps, *rope, n)
        return q, k, v.view(b, s, n, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        # the attention output goes to `o` in v's (the matmul) dtype, where the official code passes it
        # through q's fp32 first: the same values, one cast pair (2 x 3 bytes per element) fewer
        return self.o(attention(q, k, v, out_dtype=v.dtype).flatten(2))


class WanI2VCrossAttention(WanSelfAttention):
    """Cross-attention to [image tokens | text tokens]; two attentions summed before `o`."""

    def __init__(self, dim: int, num_heads: int, text_len: int, eps: float = 1e-6):
        super().__init__(dim, num_heads, eps)
        self.text_len = text_len
        self.k_img = Linear(dim, dim)
        self.v_img = Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        n_img = context.shape[1] - self.text_len
        context_img, context_txt = context[:, :n_img], context[:, n_img:]
        if hasattr(self, "kv_proj"):  # k|v and k_img|v_img as one GEMM each (kernels/fusion.py)
            k, v = self.kv_proj(context_txt).split(self.dim, dim=-1)
            k_img, v_img = self.kv_img_proj(context_img).split(self.dim, dim=-1)
        else:
            k, v = self.k(context_txt), self.v(context_txt)
            k_img, v_img = self.k_img(context_img), self.v_img(context_img)
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(k).view(b, -1, n, d)
        v = v.view(b, -1, n, d)
        k_img = self.norm_k_img(k_img).view(b, -1, n, d)
        v_img = v_img.view(b, -1, n, d)
        img_x = attention(q, k_img, v_img)
        # No text mask: the official model attends to all 512 (zero-padded) text positions.
        x = attention(q, k, v)
        return self.o(x.flatten(2) + img_x.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.text_len, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, L, dim) residual stream (fp32 after block 0); e0 (B, 6, dim) fp32."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + e0).chunk(6, dim=1)
        y = self.self_attn(norm_modulate(x, shift_sa, scale_sa, self.norm1.eps, self.self_attn.input_dtype()), rope)
        x = x + y * gate_sa
        x = x + self.cross_attn(self.norm3(x), context)
        # ffn: Linear, GELU(tanh), Linear as the official Sequential; each op writes what the next linear takes
        h = self.ffn[0](norm_modulate(x, shift_ff, scale_ff, self.norm2.eps, matmul_input_dtype(self.ffn[0])))
        y = self.ffn[2](gelu_tanh(h, matmul_input_dtype(self.ffn[2])))
        return x + y * gate_ff


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), e (B, dim) the time embedding (not e0). Entirely fp32."""
        shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP tokens of both frames (+ learned FLF2V position embedding) -> model width."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.proj = nn.Sequential(
            FP32LayerNorm(in_dim), Linear(in_dim, in_dim), nn.GELU(), Linear(in_dim, out_dim), FP32LayerNorm(out_dim)
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, num_tokens, in_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds (B, 2*N, clip_dim): first-frame tokens then last-frame tokens."""
        return self.proj(image_embeds + self.emb_pos)


# ---------------------------------------------------------------------------------------------------
# The model


class WanDiT(nn.Module):
    """forward(x, t, context, clip_fea, y) -> (B, out_dim, F, H, W) velocity prediction."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        assert cfg.dim % cfg.num_heads == 0 and cfg.head_dim % 2 == 0
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.img_emb = MLPProj(cfg.clip_dim, dim, 2 * cfg.clip_tokens)
        self.register_buffer("time_table", torch.empty(0), persistent=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()  # on the meta device too: derived tables get their shapes

    def derived_buffers(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The non-checkpoint tables: float64-exact timestep sinusoids and the RoPE angle tables."""
        cfg = self.cfg
        with torch.device("cpu"):  # real values even when the module is being built on the meta device
            table = sinusoidal_embedding(torch.arange(cfg.num_train_timesteps + 1), cfg.freq_dim).float()
            angles = rope_angles(cfg.rope_max_len, cfg.head_dim)
            cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
        return {"time_table": table.to(device), "rope_cos": cos.to(device), "rope_sin": sin.to(device)}

    def reset_buffers(self) -> None:
        """(Re)compute the derived tables on the weights' device. Called after a meta-device load."""
        for name, value in self.derived_buffers(self.patch_embedding.weight.device).items():
            setattr(self, name, value)

    # -- pieces the runtime may hoist out of the step loop -------------------------------------------

    def rope(self, f: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (f*h*w, head_dim/2) for a token grid; tokens in (f, h, w) row-major order."""
        return rope_grid(self.rope_cos, self.rope_sin, self.cfg, f, h, w)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) -> e (B, dim), e0 (B, 6, dim), fp32."""
        if t.dtype.is_floating_point:
            emb = sinusoidal_embedding(t, self.cfg.freq_dim, torch.float32)
        else:
            emb = self.time_table[t]  # (B, freq_dim): the official float64 values, rounded once
        e = self.time_embedding(emb)
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor) -> torch.Tensor:
        """context (B, text_len, text_dim), clip_fea (B, 2N, clip_dim) -> (B, 2N + text_len, dim)."""
        return torch.cat([self.img_emb(clip_fea), self.text_embedding(context)], dim=1)

    def patchify(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 16, F, H, W), y (B, 20, F, H, W) -> tokens (B, L, dim)."""
        return self.patch_embedding(torch.cat([x, y], dim=1)).flatten(2).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """(B, L, prod(patch)*C) -> (B, C, F*pt, H*ph, W*pw)."""
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b c f pt h ph w pw
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw

    def forward_tokens(self, tokens: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                       rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, e0, context, rope)
        return self.head(tokens, e)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                time_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                context_emb: torch.Tensor | None = None) -> torch.Tensor:
        """
        x (B, 16, F, H, W) noisy latent; t (B,) timesteps (int64 as the official loop feeds, or float);
        context (B, 512, text_dim) zero-padded T5 states; clip_fea (B, 2N, clip_dim) first then last
        frame tokens; y (B, 20, F, H, W) mask + conditioning latent. Returns fp32 (B, 16, F, H, W).
        rope, time_emb = embed_time(t) and context_emb = embed_context(context, clip_fea) may be given
        precomputed (the runtime computes them once per request instead of once per step).
        """
        f, h, w = self.grid(x)
        if rope is None:
            rope = self.rope(f, h, w)
        e, e0 = self.embed_time(t) if time_emb is None else time_emb
        if context_emb is None:
            context_emb = self.embed_context(context, clip_fea)
        out = self.forward_tokens(self.patchify(x, y), e, e0, context_emb, rope)
        return self.unpatchify(out, f, h, w).float()


# Modules whose parameters stay fp32 under a low-precision map (the official autocast(fp32) islands).
FP32_MODULES = ("time_embedding", "time_projection", "head")


def precision_map(model: WanDiT, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """dtype of every state_dict entry under the official precision map: matmul weights (every Linear
    and the patch Conv3d outside the fp32 islands) in `dtype`; islands, norms and modulation in fp32."""
    low = set()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Conv3d)) and not name.startswith(FP32_MODULES):
            low.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return {k: (dtype if k in low else torch.float32) for k in model.state_dict()}


def to_precision(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """Cast a loaded model in place to the official precision map (see precision_map)."""
    dtypes = precision_map(model, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
    return model
