"""FP8 GEMMs for the eager and AOTInductor paths: e4m3 weights with per-output-channel scales, activations
quantised per token, `torch._scaled_mm` (row-wise scales) on CUDA sm89+, the same math emulated elsewhere.

    y[m, n] = (sum_k xq[m, k] * wq[n, k]) * sx[m] * sw[n] + bias[n]      rounded once to out_dtype

xq = round_e4m3(x / sx) with sx[m] = amax_k |x[m, k]| / 448 (per token), wq likewise per output channel
(quantised ONCE, by `quantize_blocks` at load). The CPU emulation multiplies the e4m3 values exactly in
fp32 (a product of two 4-bit mantissas is exact), accumulates in fp32 and applies the same epilogue, so
CPU tests measure the error the GPU path has (up to the accumulation order).

This module is the whole dtype policy of the FP8 path: models/ only calls `quantize_blocks`. The ONNX
Q/DQ path (TensorRT) is wanrt/export/fp8.py and shares nothing but the e4m3 format.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_MIN = 1e-12  # an all-zero row gets this scale (its values quantise to 0 either way)
# _scaled_mm's fast accumulation (Hopper: partial sums in fp22 between promotions) is faster but not the
# math the CPU emulates; off by default, measured by benchmarks/gpu_precision.py.
FAST_ACCUM = False


class QuantizedRows(NamedTuple):
    """An activation already quantised per token, as FP8Linear would do it: q (..., K) e4m3 and its fp32
    scale (..., 1). A norm that feeds FP8 linears emits this (kernels/fused.norm_modulate with
    out_dtype=FP8), so the fp32 activation is never written; every FP8Linear on it reuses the same q."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:  # the activation's shape, as the tensor it stands for
        return self.q.shape


def quantize(x: torch.Tensor) -> QuantizedRows:
    """x (..., K) -> QuantizedRows, one scale per row (`quantize_rowwise` on the flattened rows)."""
    q, s = quantize_rowwise(x.reshape(-1, x.shape[-1]))
    return QuantizedRows(q.view(x.shape), s.view(*x.shape[:-1], 1))


class FP8Error(RuntimeError):
    """The FP8 path cannot run here (device too old, unsupported module); the message says what to do."""


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (e4m3 (..., K), fp32 scale (..., 1)) with one scale per row: amax(|row|) / 448.

    CUDA, 2-D x: the one-pass Triton kernel (wanrt::quantize_rows, kernels/triton_quant.py), the same
    numbers; elsewhere `quantize_rowwise_torch`."""
    if x.is_cuda and x.dim() == 2 and _triton_quant():
        return torch.ops.wanrt.quantize_rows(x)
    return quantize_rowwise_torch(x)


@functools.cache
def _triton_quant() -> bool:
    try:
        from . import triton_quant  # noqa: F401  (registers wanrt::quantize_rows)
    except ImportError as e:
        warnings.warn(f"triton is unavailable ({e}): FP8 activations are quantised by torch (same values, "
                      "two passes over each activation instead of one)", stacklevel=3)
        return False
    return True


def quantize_rowwise_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference quantisation in torch. Two passes over x (a max-abs reduction without a temporary,
    then divide and cast). No clamp is needed: |x| / (amax / 448) <= 448 up to one fp32 rounding, and
    448 + ulp rounds to 448 in e4m3."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.div(FP8_MAX).clamp(min=SCALE_MIN)
    return (x / scale).to(FP8), scale


def quantize_tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3, fp32 scalar scale): one scale for the whole tensor (the GEMM microbenchmark's baseline)."""
    xf = x.float()
    scale = xf.abs().amax().div(FP8_MAX).clamp(min=SCALE_MIN)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def native_supported(device: torch.device | str) -> bool:
    """True where torch._scaled_mm runs e4m3 GEMMs: CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and _capability(device.index) >= (8, 9)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:  # asked once per device, not once per GEMM
    return torch.cuda.get_device_capability(index)


def _native_shape_ok(k: int, n: int) -> bool:
    return k % 16 == 0 and n % 16 == 0


def scaled_mm_emulated(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The row-wise _scaled_mm math in fp32: xq (M, K) e4m3, sx (M, 1), wq (N, K) e4m3, sw (N,)."""
    y = (xq.float() @ wq.float().t()) * sx * sw.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def scaled_mm(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) x (N, K)^T with row-wise scales: torch._scaled_mm on CUDA sm89+, `scaled_mm_emulated` elsewhere
    (and for outputs other than bf16: row-wise _scaled_mm produces bf16 only)."""
    if xq.is_cuda and not native_supported(xq.device):
        check_device(xq.device)  # raises: an FP8 model moved onto a GPU without e4m3 GEMMs
    if xq.is_cuda and out_dtype == torch.bfloat16 and _native_shape_ok(xq.shape[1], wq.shape[0]):
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1),
                                bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                                use_fast_accum=FAST_ACCUM)
    return scaled_mm_emulated(xq, sx, wq, sw, bias, out_dtype)


class FP8Linear(nn.Module):
    """A Linear whose weight is e4m3 (out, in) with a per-output-channel fp32 `weight_scale` (out,).

    forward(x (..., in)) quantises x per token, runs `scaled_mm` and returns out_dtype (the dtype the
    replaced Linear's weight had: bf16 under the official precision map). Parameter names stay `weight`
    and `bias`, so module paths and state_dict keys are the official ones (+ `weight_scale`).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype):
        super().__init__()
        if weight.dtype != FP8:
            raise TypeError(f"FP8Linear needs an {FP8} weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        wq, sw = quantize_rowwise(linear.weight)
        return cls(wq, sw, linear.bias, linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (out, in): what the GEMM actually multiplies by (for error analysis)."""
        return self.weight.float() * self.weight_scale[:, None]

    def input_dtype(self) -> torch.dtype:
        """What this linear wants from the op before it: e4m3 rows (a QuantizedRows), see matmul_input_dtype."""
        return FP8

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):  # quantised by the op that produced it (the same numbers)
            lead = x.q.shape[:-1]
            xq, sx = x.q.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        else:
            lead = x.shape[:-1]
            xq, sx = quantize_rowwise(x.reshape(-1, self.in_features))
        y = scaled_mm(xq, sx, self.weight, self.weight_scale, self.bias, self.out_dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel, " \
               f"out_dtype={self.out_dtype}"


def check_device(device: torch.device | str) -> None:
    """Fail loudly where FP8 would silently be slow: CUDA below sm89 has no e4m3 GEMMs."""
    device = torch.device(device)
    if device.type == "cuda" and not native_supported(device):
        cap = torch.cuda.get_device_capability(device)
        raise FP8Error(f"FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada/Hopper); "
                       f"{torch.cuda.get_device_name(device)} is sm{cap[0]}{cap[1]}: use bf16 (drop --precision fp8)")


@torch.no_grad()
def quantize_linears(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` by an FP8Linear, in place, one at a time (the bf16 weight is
    freed as its e4m3 copy is made: peak memory grows by one layer). Returns the number replaced."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.weight.is_meta:
                    raise FP8Error("quantize_linears needs loaded weights (got a meta-device Linear)")
                check_device(child.weight.device)
                fp8 = FP8Linear.from_linear(child)
                if fp8.weight.is_cuda and not _native_shape_ok(fp8.in_features, fp8.out_features):
                    warnings.warn(f"{name}: {fp8.in_features}->{fp8.out_features} is not a multiple of 16; "
                                  "its FP8 GEMM runs emulated (fp32 matmul of the e4m3 values)", stacklevel=2)
                if fp8.weight.is_cuda and fp8.out_dtype != torch.bfloat16:
                    warnings.warn(f"{name}: row-wise _scaled_mm outputs bf16 only; this {fp8.out_dtype} FP8 "
                                  "GEMM runs emulated (load with the bf16 map)", stacklevel=2)
                setattr(parent, name, fp8)
                count += 1
    return count


def quantize_blocks(blocks: Sequence[nn.Module], keep: int = 0) -> list[int]:
    """The FP8 load-time transform of a transformer: every Linear of every block in FP8, except the first
    `keep` and the last `keep` blocks, which stay as they are (bf16). Returns the indices quantised."""
    n = len(blocks)
    if keep < 0 or 2 * keep > n:
        raise ValueError(f"fp8_keep={keep}: keeps the first and last N blocks in bf16, so 0 <= N <= {n // 2} "
                         f"for {n} blocks")
    done = []
    for i, block in enumerate(blocks):
        if keep <= i < n - keep:
            quantize_linears(block)
            done.append(i)
    return done


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in module.modules())
