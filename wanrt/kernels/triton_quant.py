"""Per-token (row-wise) e4m3 quantisation in one pass: each program loads one row once, takes its max |x|,
and writes the e4m3 row and its fp32 scale. The torch version (`wanrt.kernels.fp8.quantize_rowwise`)
reads the row twice and writes and re-reads an fp32 temporary: ~13 GB of traffic for a 151,200 x 5120
fp32 activation where this kernel moves 3.9 GB.

Same numbers as the torch version: scale = max(amax / 448, 1e-12) (IEEE division), q = e4m3(x / scale)
with a correctly rounded division (`div_rn`, not Triton's default approximate fp32 division) and the
GPU's round-to-nearest-even saturating cast. Under the interpreter (whose fp32 -> fp8 cast is wrong, see
triton_attention.round_e4m3) the kernel writes the e4m3 grid values in fp32 and the caller casts them,
exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_attention import INTERPRET, Launch, direct, round_e4m3

FP8_MAX = 448.0
SCALE_MIN = 1e-12


@triton.jit
def store_quantized_row(x, q_ptr, s_ptr, row, C, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr):
    """Quantise one fp32 row held in registers (0 past C) and store it: q_ptr[row, :C] e4m3 (fp32 grid
    values when EMULATE), s_ptr[row] its scale. Shared by every kernel that ends in an FP8 GEMM input."""
    row = row.to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
    y = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    if EMULATE:
        tl.store(q_ptr + row * C + offs, round_e4m3(y), mask=ok)
    else:
        tl.store(q_ptr + row * C + offs, y.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + row, scale)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, C, sx, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    x = tl.load(x_ptr + row * sx + offs, mask=offs < C, other=0.0).to(tl.float32)
    store_quantized_row(x, q_ptr, s_ptr, row, C, BLOCK_C, EMULATE)


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def empty_quantized(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for store_quantized_row: q `shape` (fp32 under the interpreter, whose fp32 -> fp8 cast is wrong:
    the kernel writes grid values, `as_e4m3` casts them exactly) and the scales (*shape[:-1], 1) fp32."""
    q = torch.empty(shape, dtype=torch.float32 if INTERPRET else torch.float8_e4m3fn, device=device)
    return q, torch.empty((*shape[:-1], 1), dtype=torch.float32, device=device)


def as_e4m3(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float8_e4m3fn) if INTERPRET else q


def quantize_rows(x: torch.Tensor, *, launch: Launch = direct) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32/bf16/fp16 -> (e4m3 (M, K), fp32 scale (M, 1)), one scale per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes (M, K), got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, c = x.shape
    q, scale = empty_quantized((m, c), x.device)
    block = triton.next_power_of_2(c)
    if m:
        launch(quantize_rows_kernel)[(m,)](x, q, scale, c, x.stride(0), BLOCK_C=block, EMULATE=INTERPRET,
                                           num_warps=_row_warps(block))
    return as_e4m3(q), scale


def _runs_triton(t: torch.Tensor) -> bool:
    """CUDA: always (fake tensors too: export traces the launch); CPU: real tensors under the interpreter."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET and not is_fake(t))


@torch.library.triton_op("wanrt::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch.library op (visible to torch.compile / AOTInductor); elsewhere the torch version."""
    if not _runs_triton(x):
        from .fp8 import quantize_rowwise_torch

        return quantize_rowwise_torch(x)
    return quantize_rows(x, launch=torch.library.wrap_triton)
