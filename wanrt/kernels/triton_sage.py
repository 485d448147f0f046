"""SageAttention-style 8-bit attention in Triton: INT8 Q.K^T, FP8 (or FP16) P.V, fp32 softmax.

Three preparation passes, then the attention loop (all O(L) except the last, which is O(L^2)):
1. Q -> int8 per (batch, head, BLOCK_M rows) block, with the softmax scale and log2(e) folded in before
   quantising, so the int32 dot times (q_scale * k_scale) is already the log2-domain score.
2. K -> int8 per BLOCK_N block after subtracting the per-channel mean over all keys. The mean adds
   q.mean_k to every score of a query row, which softmax ignores, but it removes the large shared
   offset K channels carry, so the int8 grid spends its 255 levels on what differs between keys.
3. V -> FP8 e4m3 (or FP16) with a per-channel scale amax/448, stored transposed (B, H, D, L) so the
   P.V operand is K-major (what FP8 tensor-core dots require on Hopper).
4. Online softmax as in flash attention; P in [0, 1] is scaled by 448 into the FP8 range before the
   P.V dot and the scale is divided out at the end together with V's channel scale. Each P.V block
   product is added to the fp32 accumulator separately (not chained into the dot), so a Hopper FP8
   dot only ever accumulates BLOCK_N products in its reduced-precision accumulator.

Quantised tensors are padded to whole blocks and to BLOCK_D with zeros, so the attention loop loads
without masks; only the scores of padded keys in the last block are masked.

P.V precision: "fp8" needs FP8 tensor cores (sm89+); "fp16" works everywhere; "auto" picks FP8 on
sm89+ CUDA devices and FP16 elsewhere. The Triton interpreter's fp32->fp8 cast is wrong (see
triton_attention), so under the interpreter "fp8" is emulated: values are rounded to the e4m3 grid
with integer ops and held in fp16 (every e4m3 value is exact in fp16), which reproduces the GPU's
FP8 P.V numerics and lets CPU tests measure the FP8 error.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_attention import INTERPRET, LOG2E, Launch, block_d, check_qkv, direct, round_e4m3, round_to, with_overrides

FP8_MAX = 448.0  # largest finite float8 e4m3fn


@triton.jit
def quant_int8_kernel(x_ptr, mean_ptr,
                      L, H, sxb, sxl, sxh,
                      xq_ptr, scale_ptr,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, MULT: tl.constexpr,
                      HAS_MEAN: tl.constexpr):
    """grid (L_pad / BLOCK, B * H). x (B, L, H, D) -> xq (B, H, L_pad, BLOCK_D) int8 and
    scale (B*H, L_pad / BLOCK).

    xq = round((x - mean) * MULT / scale), scale = amax|(x - mean) * MULT| / 127 over the block.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < L) & (offs_d[None, :] < D)
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxl + offs_d[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)  # padding stays exactly zero
    x = x * MULT
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / 127.0, 1e-30)  # all-zero block: q = 0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)  # round half away from zero; the int cast truncates
    n_pad = tl.num_programs(0) * BLOCK
    out = xq_ptr + bh.to(tl.int64) * n_pad * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(out, y.to(tl.int8))
    tl.store(scale_ptr + bh * tl.num_programs(0) + pid, scale)


@triton.jit
def quant_v_kernel(v_ptr, vscale_ptr,
                   L, H, svb, svl, svh,
                   vq_ptr,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """grid (L_pad / BLOCK, B * H). v (B, L, H, D) -> vq (B, H, BLOCK_D, L_pad) = v / vscale[channel]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < L) & (offs_d[None, :] < D)
    v = tl.load(v_ptr + b * svb + h * svh + rows[:, None] * svl + offs_d[None, :], mask=ok, other=0.0)
    vs = tl.load(vscale_ptr + bh * D + offs_d, mask=offs_d < D, other=1.0)
    y = v.to(tl.float32) / vs[None, :]
    if EMULATE_FP8:
        y = round_e4m3(y)
    n_pad = tl.num_programs(0) * BLOCK
    out = vq_ptr + bh.to(tl.int64) * BLOCK_D * n_pad + offs_d[None, :] * n_pad + rows[:, None]
    tl.store(out, y.to(vq_ptr.dtype.element_ty))


@triton.jit
def _sage_step(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base, start, Lk, Lk_pad, offs_n, offs_d,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
               EMULATE_FP8: tl.constexpr):
    cols = start + offs_n
    k = tl.load(k_base + cols[:, None] * BLOCK_D + offs_d[None, :])  # (BLOCK_N, BLOCK_D) int8
    k_scale = tl.load(ks_base + start // BLOCK_N)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)  # log2 units
    if MASK_N:
        s = tl.where(cols[None, :] < Lk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N) in [0, 1]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_d[None, :] * Lk_pad + cols[:, None])  # (BLOCK_N, BLOCK_D), keys contiguous
    p = p * 448.0  # into the FP8 range; divided out in the epilogue
    if EMULATE_FP8:
        p = round_e4m3(p)
    pv = tl.dot(p.to(v.dtype), v)  # fp32 result; FP8 x FP8 or FP16 x FP16
    acc = acc * alpha[:, None] + pv  # second-level accumulation in fp32
    return acc, m_new, l_i


@triton.jit
def sage_fwd_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr,
                    Lq, Lk, H, sob, sol, soh,
                    o_ptr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    EMULATE_FP8: tl.constexpr, EMULATE: tl.constexpr):
    """grid (Lq_pad / BLOCK_M, B * H). q (B, H, Lq_pad, BLOCK_D) int8, k (B, H, Lk_pad, BLOCK_D) int8,
    v (B, H, BLOCK_D, Lk_pad) fp8/fp16; qs (B*H, Lq_pad/BLOCK_M), ks (B*H, Lk_pad/BLOCK_N), vs (B*H, D)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    Lq_pad = tl.num_programs(0) * BLOCK_M
    Lk_pad = tl.cdiv(Lk, BLOCK_N) * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = tl.load(q_ptr + bh64 * Lq_pad * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(qs_ptr + bh * tl.num_programs(0) + pid_m)
    k_base = k_ptr + bh64 * Lk_pad * BLOCK_D
    ks_base = ks_ptr + bh * (Lk_pad // BLOCK_N)
    v_base = v_ptr + bh64 * BLOCK_D * Lk_pad

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _sage_step(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base, start, Lk, Lk_pad,
                                   offs_n, offs_d, BLOCK_D, BLOCK_N, False, EMULATE_FP8)
    if n_full < Lk:
        acc, m_i, l_i = _sage_step(acc, m_i, l_i, q, q_scale, k_base, ks_base, v_base, n_full, Lk, Lk_pad,
                                   offs_n, offs_d, BLOCK_D, BLOCK_N, True, EMULATE_FP8)

    d_ok = offs_d < D
    vs = tl.load(vs_ptr + bh * D + offs_d, mask=d_ok, other=0.0)
    out = acc * (vs / 448.0)[None, :] / l_i[:, None]
    o_dtype: tl.constexpr = o_ptr.dtype.element_ty
    if EMULATE:
        out = round_to(out, o_dtype, EMULATE)
    o_ptrs = o_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_dtype), mask=(offs_m[:, None] < Lq) & d_ok[None, :])


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core dots: NVIDIA sm89 (Ada) and newer."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_pv(pv: str, device: torch.device) -> str:
    """'auto' | 'fp8' | 'fp16' -> 'fp8' | 'fp16'. Under the interpreter 'auto' means fp16 (its fp8 cast
    is broken) and an explicit 'fp8' is emulated."""
    if pv == "auto":
        return "fp8" if (not INTERPRET and fp8_supported(device)) else "fp16"
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"pv must be 'auto', 'fp8' or 'fp16', got {pv!r}")
    if pv == "fp8" and not INTERPRET and not fp8_supported(device):
        raise RuntimeError(f"FP8 P.V needs an sm89+ CUDA device, not {device}")
    return pv


def sage_config(d: int) -> dict:
    if INTERPRET:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if block_d(d, 32) <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    # D = 128 (the 14B model): 64x128 tiles, 4 warps, measured fastest of 12 on an H200 at L = 75,600
    # (328 ms, 713 TFLOP/s; the 128x64 / 8-warp tiles before: 417 ms; cuDNN SDPA: 398 ms),
    # benchmarks/results/h200-2026-12-04/attention-sweep.json
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "auto",
                   smooth_k: bool = True, block_m: int | None = None, block_n: int | None = None,
                   config: dict | None = None, launch: Launch = direct) -> torch.Tensor:
    """8-bit softmax(q k^T / sqrt(D)) v; q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D) in v's dtype.

    pv: P.V precision ("auto" | "fp8" | "fp16", see resolve_pv). smooth_k=False skips the K mean
    subtraction (for measuring what it buys). config: overrides of sage_config's BLOCK_M / BLOCK_N /
    num_warps / num_stages (tile sweeps).
    """
    check_qkv(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, lq, h, d = q.shape
    lk = k.shape[1]
    mode = resolve_pv(pv, q.device)
    emulate_fp8 = mode == "fp8" and INTERPRET
    cfg = with_overrides(sage_config(d), config)
    bm, bn = block_m or cfg["BLOCK_M"], block_n or cfg["BLOCK_N"]
    bd = block_d(d, 32)  # int8 dots want K >= 32
    lq_pad, lk_pad = triton.cdiv(lq, bm) * bm, triton.cdiv(lk, bn) * bn
    dev, warps = q.device, {"num_warps": 4}

    q8 = torch.empty((b, h, lq_pad, bd), dtype=torch.int8, device=dev)
    qs = torch.empty((b * h, lq_pad // bm), dtype=torch.float32, device=dev)
    launch(quant_int8_kernel)[(lq_pad // bm, b * h)](
        q, q, lq, h, *q.stride()[:3], q8, qs,
        D=d, BLOCK_D=bd, BLOCK=bm, MULT=LOG2E / math.sqrt(d), HAS_MEAN=False, **warps)

    # (B, H, D) channel means; mean(dtype=fp32) accumulates in fp32 without materialising an fp32 k
    k_mean = k.mean(dim=1, dtype=torch.float32) if smooth_k else k
    k8 = torch.empty((b, h, lk_pad, bd), dtype=torch.int8, device=dev)
    ks = torch.empty((b * h, lk_pad // bn), dtype=torch.float32, device=dev)
    launch(quant_int8_kernel)[(lk_pad // bn, b * h)](
        k, k_mean, lk, h, *k.stride()[:3], k8, ks,
        D=d, BLOCK_D=bd, BLOCK=bn, MULT=1.0, HAS_MEAN=smooth_k, **warps)

    v_min, v_max = torch.aminmax(v, dim=1)  # (B, H, D) each; no |v| temporary
    v_scale = torch.maximum(v_max.float(), -v_min.float()).clamp_min(1e-30) / FP8_MAX
    pv_dtype = torch.float8_e4m3fn if (mode == "fp8" and not emulate_fp8) else torch.float16
    vq = torch.empty((b, h, bd, lk_pad), dtype=pv_dtype, device=dev)
    launch(quant_v_kernel)[(lk_pad // bn, b * h)](
        v, v_scale, lk, h, *v.stride()[:3], vq, D=d, BLOCK_D=bd, BLOCK=bn, EMULATE_FP8=emulate_fp8, **warps)

    o = torch.empty((b, lq, h, d), dtype=v.dtype, device=dev)
    launch(sage_fwd_kernel)[(lq_pad // bm, b * h)](
        q8, qs, k8, ks, vq, v_scale, lq, lk, h, *o.stride()[:3], o,
        D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, EMULATE_FP8=emulate_fp8, EMULATE=INTERPRET,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o
