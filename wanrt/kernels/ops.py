"""The Triton kernels as torch.library ops, plugged into the attention and fused-kernel seams.

Importing this module needs triton (the seams import it lazily and skip it on ImportError). It defines

    wanrt::flash_attention(q, k, v)                              -> (B, Lq, H, D), q's dtype
    wanrt::sage_attention(q, k, v)                               -> (B, Lq, H, D), v's dtype
    wanrt::norm_modulate(x, shift, scale, eps, out_dtype)        -> (B, L, C) fp32 (or out_dtype)
    wanrt::norm_modulate_quant(x, shift, scale, eps)             -> (B, L, C) e4m3, (B, L, 1) fp32 scales
    wanrt::gelu_quant(x)                                         -> (..., C) e4m3, (..., 1) fp32 scales
    wanrt::qk_norm_rope(x, weight, eps, cos, sin, num_heads)     -> (B, L, H, D) fp32

with `torch.library.triton_op`: eager calls run the kernels directly, and torch.compile / AOTInductor see
the Triton kernels themselves (not an opaque call), so an AOTInductor package compiles them in and
needs no Python at run time. The op body doubles as the fake (meta) implementation, which is how
torch.export and the ONNX exporter get output shapes.

Where each runs:
- CUDA tensors: the Triton kernels.
- CPU tensors with TRITON_INTERPRET=1 (set before triton is imported; tests/conftest.py does it when no
  GPU is present): the same kernels under Triton's interpreter.
- CPU tensors otherwise, and fake tensors under the interpreter: the exact torch references (sage's
  CPU fallback is therefore exact attention, not quantised).

Selection: `wanrt.kernels.attention.use("flash" | "sage")` and `wanrt.kernels.fused.use("triton")` (or
their `set_default`); this module only registers the names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton  # noqa: F401  (ImportError here is how the seams learn that triton is absent)
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from . import attention as _attention
from . import fused as _fused
from . import triton_attention, triton_fused, triton_sage
from .triton_attention import INTERPRET


def _runs_triton(t: torch.Tensor) -> bool:
    """True where a Triton launch is possible for tensors like `t` (and they hold real data)."""
    if t.device.type == "cuda":
        return True
    # The interpreter reads tensor memory, so fake tensors (export, tracing) take the reference path,
    # which produces the same shapes and dtypes.
    return t.device.type == "cpu" and INTERPRET and not is_fake(t)


def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


@triton_op("wanrt::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v; q (B, Lq, H, D), k/v (B, Lk, H, D), one dtype (bf16/fp16/fp32)."""
    if not _runs_triton(q):
        return _attention_ref(q, k, v)
    return triton_attention.flash_attention(q, k, v, launch=wrap_triton)


@triton_op("wanrt::sage_attention", mutates_args=())
def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """INT8 Q.K^T / FP8-or-FP16 P.V attention (P.V precision chosen by triton_sage.resolve_pv('auto'))."""
    if not _runs_triton(q):
        return _attention_ref(q, k, v)
    return triton_sage.sage_attention(q, k, v, pv="auto", launch=wrap_triton)


@triton_op("wanrt::norm_modulate", mutates_args=())
def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LayerNorm(x) (no affine, fp32 stats, rounded to x's dtype) * (1 + scale) + shift -> (B, L, C) in
    out_dtype (fp32; or the bf16/fp16 of the linear it feeds, rounded in the kernel)."""
    if not _runs_triton(x):
        return _fused._norm_modulate_ref(x, shift, scale, eps, out_dtype)
    return triton_fused.norm_modulate(x, shift, scale, eps, out_dtype, launch=wrap_triton)


@triton_op("wanrt::norm_modulate_quant", mutates_args=())
def norm_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_modulate's fp32 result quantised per token for an FP8 linear -> (e4m3 (B, L, C), fp32 (B, L, 1))."""
    if not _runs_triton(x):
        return _fused._norm_modulate_quant_ref(x, shift, scale, eps)
    return triton_fused.norm_modulate_quant(x, shift, scale, eps, launch=wrap_triton)


@triton_op("wanrt::gelu_quant", mutates_args=())
def gelu_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh GELU in x's dtype quantised per token for an FP8 linear -> (e4m3 (..., C), fp32 (..., 1))."""
    if not _runs_triton(x):
        return _fused._gelu_quant_ref(x)
    return triton_fused.gelu_quant(x, launch=wrap_triton)


@triton_op("wanrt::qk_norm_rope", mutates_args=())
def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int) -> torch.Tensor:
    """RMSNorm over the full width * weight, split into heads, interleaved RoPE -> fp32 (B, L, H, D)."""
    if not _runs_triton(x):
        return _fused._qk_norm_rope_ref(x, weight, eps, cos, sin, num_heads)
    return triton_fused.qk_norm_rope(x, weight, eps, cos, sin, num_heads, launch=wrap_triton)


# ---------------------------------------------------------------------------------------------------
# Seam registration: the models call the seams, the seams call these ops.


@_attention.register("flash")
def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.wanrt.flash_attention(q, k, v)


@_attention.register("sage")
def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.wanrt.sage_attention(q, k, v)


@_fused.register("triton", "norm_modulate")
def _norm_modulate(x, shift, scale, eps, out_dtype=torch.float32):
    return torch.ops.wanrt.norm_modulate(x, shift, scale, float(eps), out_dtype)


@_fused.register("triton", "norm_modulate_quant")
def _norm_modulate_quant(x, shift, scale, eps):
    return torch.ops.wanrt.norm_modulate_quant(x, shift, scale, float(eps))


@_fused.register("triton", "gelu_quant")
def _gelu_quant(x):
    return torch.ops.wanrt.gelu_quant(x)


@_fused.register("triton", "qk_norm_rope")
def _qk_norm_rope(x, weight, eps, cos, sin, num_heads):
    return torch.ops.wanrt.qk_norm_rope(x, weight, float(eps), cos, sin, int(num_heads))
