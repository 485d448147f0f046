"""Flash attention forward in Triton: softmax(q k^T / sqrt(D)) v, non-causal, layout (B, L, H, D).

One program owns BLOCK_M query rows of one (batch, head) and streams over the keys in BLOCK_N blocks
with the online softmax (running row max m, running denominator l, rescaled fp32 accumulator), so
the (Lq, Lk) score matrix never exists in memory. Scores are kept in the log2 domain
(scale folded with log2(e)) so the inner loop uses exp2. Only the last key block is masked, so the
steady-state loop has no masks at all; D that is not a power of two (80) is zero-padded to BLOCK_D
by masked loads, which leaves q.k and p.v unchanged.

Inputs are BF16 / FP16 (tensor-core dots, fp32 accumulation) or FP32 (IEEE fp32 dots, no TF32, so an
fp32 model keeps fp32 attention). P is rounded to V's dtype before P.V, as in FlashAttention.

The Triton interpreter (TRITON_INTERPRET=1, CPU) is also a target. It mishandles bf16 (bf16 tensors
are uint16 arrays there: bf16 arithmetic and dots return garbage, and fp32->bf16 casts truncate
instead of rounding) and its fp32->fp8 cast drops the carry when rounding crosses a binade (7.8 -> 4.0).
So under the interpreter (EMULATE=True) tiles are upcast to fp32 right after loading - exact, bf16 and
fp16 products are exact in fp32 - and every rounding the GPU does (P to bf16/fp16, outputs to bf16,
P/V to fp8 in sage) is reproduced with integer bit operations. The interpreted numerics are therefore
the GPU numerics up to the summation order, which is what makes the CPU tests meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Kernels are InterpretedFunctions when TRITON_INTERPRET=1 was set before triton was imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
LOG2E = 1.4426950408889634


def direct(kernel):
    """Launch wrapper for plain eager calls; ops.py passes torch.library.wrap_triton instead."""
    return kernel


Launch = Callable[[object], object]

# ---------------------------------------------------------------------------------------------------
# Rounding helpers shared by all kernels (fp32 in, fp32 out holding a value of the narrower grid).


@triton.jit
def round_bf16(x):
    """Round fp32 to the nearest bf16 (ties to even), result kept in fp32.

    The interpreter's own fp32->bf16 cast truncates; integer ops behave the same everywhere.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(x):
    """Round fp32 to the nearest float8 e4m3fn value (ties to even, saturating at +-448), in fp32.

    Mirrors the GPU's cvt.rn.satfinite.e4m3: normals keep 3 mantissa bits; below 2**-6 the grid is
    the subnormal step 2**-9, obtained by letting the fp32 adder round at 2**14 (ulp 2**-9 there).
    """
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = ((bits >> 20) << 20).to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(x < 0, -r, r)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> fp32 rounded to `dtype` (what `.to(dtype).float()` does in torch)."""
    if dtype == tl.float32:
        y = x
    elif EMULATE and dtype == tl.bfloat16:
        y = round_bf16(x)
    else:
        y = x.to(dtype).to(tl.float32)
    return y


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what may be out of bounds (masks cost bandwidth)."""
    if MASK_ROWS:
        if MASK_D:
            t = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_D:
            t = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


# ---------------------------------------------------------------------------------------------------
# The kernel. Argument order = inputs, int32 scalars, outputs, constexprs: the order TensorRT's AOT
# plugin launcher passes them in (see trt_plugins.py), so the same kernel serves torch and TensorRT.


@triton.jit
def _flash_step(acc, m_i, l_i, q, k_base, v_base, start, Lk, skl, svl, offs_n, offs_d, d_ok,
                QK_SCALE: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
                PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    cols = start + offs_n  # (BLOCK_N,) key positions
    cols_ok = cols < Lk
    k = _load_rows(k_base + cols[:, None] * skl + offs_d[None, :], cols_ok, d_ok, MASK_N, MASK_D)
    v = _load_rows(v_base + cols[:, None] * svl + offs_d[None, :], cols_ok, d_ok, MASK_N, MASK_D)
    v_dtype: tl.constexpr = v.dtype
    if EMULATE:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(cols_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has at least one valid key
    alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if EMULATE:
        acc = tl.dot(round_to(p, v_dtype, EMULATE), v, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p.to(v_dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def flash_fwd_kernel(q_ptr, k_ptr, v_ptr,
                     Lq, Lk, H,
                     sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                     o_ptr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     QK_SCALE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """grid (cdiv(Lq, BLOCK_M), B * H); q/o (B, Lq, H, D), k/v (B, Lk, H, D), unit stride over D."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: B * L * H * D can pass 2**31 at 720p with batch > 5
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    MASK_D: tl.constexpr = D != BLOCK_D
    rows_ok = offs_m < Lq

    q = _load_rows(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], rows_ok, d_ok,
                   True, MASK_D)  # (BLOCK_M, BLOCK_D); rows past Lq are zeros, dropped at the store
    if EMULATE:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, q, k_base, v_base, start, Lk, skl, svl, offs_n, offs_d,
                                    d_ok, QK_SCALE, False, MASK_D, PRECISION, EMULATE)
    if n_full < Lk:  # ragged tail: the only masked block
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, q, k_base, v_base, n_full, Lk, skl, svl, offs_n, offs_d,
                                    d_ok, QK_SCALE, True, MASK_D, PRECISION, EMULATE)

    out = acc / l_i[:, None]
    o_dtype: tl.constexpr = o_ptr.dtype.element_ty
    if EMULATE:
        out = round_to(out, o_dtype, EMULATE)
    o_ptrs = o_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_dtype), mask=rows_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configuration and the Python entry point.


def block_d(d: int, minimum: int = 16) -> int:
    """Head dim padded to a power of two (tl.arange and tl.dot need one); 80 -> 128."""
    return max(minimum, triton.next_power_of_2(d))


def flash_config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes. GPU: 128x64 tiles, the usual Ampere/Hopper sweet spot for D <= 128 with bf16/fp16
    (Q tile + 3-stage K/V ring fit the shared memory); fp32 needs half the tiles to fit. Interpreter:
    32x32, small enough for short tests yet giving several blocks and a ragged tail at L ~ 100."""
    if INTERPRET:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if block_d(d) <= 64 else 8, "num_stages": 3}


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, Lq, H, D), k/v (B, Lk, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype (the seam casts q/k to v's); got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined")


def with_overrides(cfg: dict, config: dict | None) -> dict:
    """A kernel's default tile config with `config`'s keys replacing its own (for tile sweeps)."""
    if config:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"unknown tile config keys {sorted(unknown)}; known: {sorted(cfg)}")
        cfg = {**cfg, **config}
    return cfg


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int | None = None,
                    block_n: int | None = None, config: dict | None = None,
                    launch: Launch = direct) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D) in q's dtype.
    config: overrides of flash_config's BLOCK_M / BLOCK_N / num_warps / num_stages (tile sweeps)."""
    check_qkv(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cfg = with_overrides(flash_config(d, q.dtype), config)
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    o = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(lq, bm), b * h)
    launch(flash_fwd_kernel)[grid](
        q, k, v, lq, lk, h, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], o,
        D=d, BLOCK_D=block_d(d), BLOCK_M=bm, BLOCK_N=bn, QK_SCALE=LOG2E / math.sqrt(d),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", EMULATE=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o
