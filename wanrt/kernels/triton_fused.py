"""Fused elementwise kernels of the DiT block, one program per token row, one read of the row.

- norm_modulate: LayerNorm without affine (fp32 mean/variance), rounded to x's dtype as the official
  `WanLayerNorm(x).type_as(x)` does, then y * (1 + scale) + shift in fp32.
- qk_norm_rope: RMSNorm over the full hidden width (fp32 statistics, rounded to x's dtype) times the
  weight (in the promoted dtype of x and weight, as torch does), then RoPE on adjacent channel pairs
  (2k, 2k+1) with the angle of (token, k mod D/2); fp32 out, (B, L, C) == (B, L, H, D) contiguous.
- norm_modulate_quant: norm_modulate's fp32 row quantised per token to e4m3 as an FP8 linear does to its
  input (kernels/triton_quant.py's math): the FP8 GEMM's input written at 1 byte an element plus one scale,
  where norm_modulate + quantize_rows write 4, read them back and write 1.

Both match `wanrt.kernels.fused`'s references including those intermediate roundings. The row is
held in registers between the statistics and the output (C = 5120 -> 8192-wide block, 32 values per
thread with 8 warps), so each input byte is read from memory once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_attention import INTERPRET, Launch, direct, round_to
from .triton_quant import as_e4m3, empty_quantized, store_quantized_row

# dtype codes for constexprs (plain ints keep Inductor's and the AOT compiler's signatures simple)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def round_code(x, CODE: tl.constexpr, EMULATE: tl.constexpr):
    if CODE == 1:
        y = round_to(x, tl.float16, EMULATE)
    elif CODE == 2:
        y = round_to(x, tl.bfloat16, EMULATE)
    else:
        y = x
    return y


@triton.jit
def _modulated_row(x_ptr, shift_ptr, scale_ptr, row, L, C, sxb, sxl, ssb, scb,
                   EPS: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr):
    """One token row: LayerNorm (fp32 stats, rounded to x's dtype) * (1 + scale) + shift, fp32."""
    b = (row // L).to(tl.int64)
    t = (row % L).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x_raw = tl.load(x_ptr + b * sxb + t * sxl + offs, mask=ok, other=0.0)
    x = x_raw.to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(ok, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / C  # biased, as F.layer_norm
    y = round_to(xc * tl.rsqrt(var + EPS), x_raw.dtype, EMULATE)  # .type_as(x)
    sh = tl.load(shift_ptr + b * ssb + offs, mask=ok, other=0.0)
    sc = tl.load(scale_ptr + b * scb + offs, mask=ok, other=0.0)
    return y * (1.0 + sc) + sh


@triton.jit
def norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr,
                         L, C, sxb, sxl, ssb, scb,
                         out_ptr,
                         EPS: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr,
                         OUT_CODE: tl.constexpr = 0):
    """grid (B * L,). x (B, L, C); shift, scale (B, 1, C) fp32 (batch stride 0 = broadcast) -> out fp32, or
    rounded to fp16/bf16 (OUT_CODE 1/2, out_ptr of that dtype) for the linear it feeds."""
    row = tl.program_id(0)
    out = _modulated_row(x_ptr, shift_ptr, scale_ptr, row, L, C, sxb, sxl, ssb, scb, EPS, BLOCK_C, EMULATE)
    out = round_code(out, OUT_CODE, EMULATE)  # the cast the next linear would do
    offs = tl.arange(0, BLOCK_C)
    tl.store(out_ptr + row.to(tl.int64) * C + offs, out, mask=offs < C)


@triton.jit
def norm_modulate_quant_kernel(x_ptr, shift_ptr, scale_ptr,
                               L, C, sxb, sxl, ssb, scb,
                               q_ptr, s_ptr,
                               EPS: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr):
    """grid (B * L,). As norm_modulate_kernel, then the FP8 linear's per-token quantisation of that fp32 row
    (kernels/triton_quant.py's math) without writing it: q (B*L, C) e4m3 (fp32 grid values when EMULATE),
    s (B*L,) fp32 = max(amax / 448, 1e-12)."""
    row = tl.program_id(0)
    out = _modulated_row(x_ptr, shift_ptr, scale_ptr, row, L, C, sxb, sxl, ssb, scb, EPS, BLOCK_C, EMULATE)
    store_quantized_row(tl.where(tl.arange(0, BLOCK_C) < C, out, 0.0), q_ptr, s_ptr, row, C, BLOCK_C, EMULATE)


@triton.jit
def _tanh(u, EMULATE: tl.constexpr):
    if EMULATE:  # the interpreter has no libdevice: tanh from exp (a few fp32 ulps from tanhf)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0, -t, t)
    else:
        t = libdevice.tanh(u)  # CUDA's tanhf, what torch's GELU kernel calls
    return t


@triton.jit
def gelu_quant_kernel(x_ptr, q_ptr, s_ptr, C, sx, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr):
    """grid (M,). x (M, C) -> GELU(x, tanh) in fp32 in torch's operation order, rounded to x's dtype, then
    quantised per row: q (M, C) e4m3 (fp32 grid values when EMULATE), s (M,) fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x_raw = tl.load(x_ptr + row * sx + offs, mask=ok, other=0.0)
    x = x_raw.to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # sqrt(2 / pi) (x + 0.044715 x^3)
    g = round_to(0.5 * x * (1.0 + _tanh(inner, EMULATE)), x_raw.dtype, EMULATE)
    store_quantized_row(g, q_ptr, s_ptr, row, C, BLOCK_C, EMULATE)


@triton.jit
def qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr,
                        L, C, HALF_D, sxb, sxl, scl,
                        out_ptr,
                        EPS: tl.constexpr, BLOCK_P: tl.constexpr, PROD_CODE: tl.constexpr,
                        EMULATE: tl.constexpr):
    """grid (B * L,). x (B, L, C), w (C,), cos/sin (L, HALF_D) fp32 -> out (B, L, C) fp32.

    The row is loaded contiguously as BLOCK_P pairs and split into even/odd channels (one coalesced
    read instead of two strided ones), then re-interleaved for one coalesced store.
    """
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    t = (row % L).to(tl.int64)
    offs = tl.arange(0, 2 * BLOCK_P)
    ok = offs < C
    x_raw = tl.load(x_ptr + b * sxb + t * sxl + offs, mask=ok, other=0.0)
    x = x_raw.to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / C + EPS)
    n = round_to(x * r, x_raw.dtype, EMULATE)  # .type_as(x)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = round_code(n * w, PROD_CODE, EMULATE)  # * weight, in promote_types(x, w)
    ye, yo = tl.split(tl.reshape(y, [BLOCK_P, 2]))  # channels 2k, 2k+1
    k = tl.arange(0, BLOCK_P)
    j = k % HALF_D  # frequency index of pair k (pairs of head h are k = h*HALF_D .. (h+1)*HALF_D-1)
    pk = k < C // 2
    c = tl.load(cos_ptr + t * scl + j, mask=pk, other=0.0)
    s = tl.load(sin_ptr + t * scl + j, mask=pk, other=0.0)
    out = tl.interleave(ye * c - yo * s, ye * s + yo * c)
    tl.store(out_ptr + row.to(tl.int64) * C + offs, out, mask=ok)


def _row_warps(block: int) -> int:
    return 1 if INTERPRET else min(max(block // 256, 1), 8)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  out_dtype: torch.dtype = torch.float32, *, launch: Launch = direct) -> torch.Tensor:
    """x (B, L, C); shift, scale broadcastable to (B, 1, C) -> (B, L, C) in out_dtype (fp32, fp16, bf16)."""
    b, l, c = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    shift, scale = (s.float().expand(b, 1, c) for s in (shift, scale))
    shift, scale = (s if s.stride(-1) == 1 else s.contiguous() for s in (shift, scale))
    out = torch.empty((b, l, c), dtype=out_dtype, device=x.device)
    block = triton.next_power_of_2(c)
    launch(norm_modulate_kernel)[(b * l,)](
        x, shift, scale, l, c, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), out,
        EPS=float(eps), BLOCK_C=block, EMULATE=INTERPRET, OUT_CODE=DTYPE_CODE[out_dtype],
        num_warps=_row_warps(block))
    return out


def norm_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, *,
                        launch: Launch = direct) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, C); shift, scale broadcastable to (B, 1, C) -> (e4m3 (B, L, C), fp32 scale (B, L, 1)): the
    fp32 norm_modulate output quantised per token as an FP8 linear would, the fp32 row never written."""
    b, l, c = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    shift, scale = (s.float().expand(b, 1, c) for s in (shift, scale))
    shift, scale = (s if s.stride(-1) == 1 else s.contiguous() for s in (shift, scale))
    q, s = empty_quantized((b, l, c), x.device)
    block = triton.next_power_of_2(c)
    if b * l:
        launch(norm_modulate_quant_kernel)[(b * l,)](
            x, shift, scale, l, c, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), q, s,
            EPS=float(eps), BLOCK_C=block, EMULATE=INTERPRET, num_warps=_row_warps(block))
    return as_e4m3(q), s


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, *, launch: Launch = direct) -> torch.Tensor:
    """x (B, L, C), weight (C,), cos/sin (L, D/2) -> fp32 (B, L, H, D), D = C / num_heads."""
    b, l, c = x.shape
    d = c // num_heads
    if d * num_heads != c or d % 2:
        raise ValueError(f"hidden size {c} is not num_heads={num_heads} x an even head dim")
    if cos.shape != (l, d // 2) or sin.shape != (l, d // 2):
        raise ValueError(f"cos/sin must be (L, D/2) = ({l}, {d // 2}); got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (t.float().contiguous() for t in (cos, sin))
    prod = DTYPE_CODE[torch.promote_types(x.dtype, weight.dtype)]
    out = torch.empty((b, l, num_heads, d), dtype=torch.float32, device=x.device)
    block_p = triton.next_power_of_2(c // 2)
    launch(qk_norm_rope_kernel)[(b * l,)](
        x, weight.contiguous(), cos, sin, l, c, d // 2, x.stride(0), x.stride(1), cos.stride(0), out,
        EPS=float(eps), BLOCK_P=block_p, PROD_CODE=prod, EMULATE=INTERPRET, num_warps=_row_warps(2 * block_p))
    return out


def gelu_quant(x: torch.Tensor, *, launch: Launch = direct) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C) bf16/fp16/fp32 -> (e4m3 (..., C), fp32 scale (..., 1)): tanh GELU in x's dtype, quantised per
    token as an FP8 linear quantises its input; the GELU output itself is never written."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    q, s = empty_quantized((m, c), x.device)
    block = triton.next_power_of_2(c)
    if m:
        launch(gelu_quant_kernel)[(m,)](rows, q, s, c, rows.stride(0), BLOCK_C=block, EMULATE=INTERPRET,
                                        num_warps=_row_warps(block))
    return as_e4m3(q).view(x.shape), s.view(*x.shape[:-1], 1)
