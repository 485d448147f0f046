"""Seams for the fused elementwise kernels the DiT uses (besides attention, see attention.py).

`norm_modulate` and `qk_norm_rope` have a PyTorch reference implementation here that is exactly the
official math; Triton versions register under another name and are selected with `use("triton")`
or `set_default("triton")`. The models call these functions and never know which one runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import fp8

_IMPLS: dict[str, dict[str, Callable]] = {"torch": {}}
_state = threading.local()
_default = "torch"


def register(impl: str, op: str):
    def deco(fn):
        _IMPLS.setdefault(impl, {})[op] = fn
        return fn

    return deco


def available() -> list[str]:
    _load_optional()
    return sorted(_IMPLS)


def current() -> str:
    return getattr(_state, "name", None) or _default


def set_default(name: str) -> None:
    global _default
    check(name)
    _default = name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    check(name)
    prev = getattr(_state, "name", None)
    _state.name = name
    try:
        yield
    finally:
        _state.name = prev


def check(name: str) -> None:
    _load_optional()
    if name not in _IMPLS:
        raise ValueError(f"unknown fused-kernel implementation {name!r}; available: {', '.join(sorted(_IMPLS))}")


_optional_loaded = False


def _load_optional() -> None:
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    with contextlib.suppress(ImportError):
        from . import ops  # noqa: F401  (registers the Triton implementations when triton imports)


def _dispatch(op: str) -> Callable:
    impl = _IMPLS[current()]
    return impl.get(op, _IMPLS["torch"][op])


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor | fp8.QuantizedRows:
    """LayerNorm(x) (no affine, fp32 statistics, rounded to x's dtype) * (1 + scale) + shift, in fp32.

    x (B, L, C); shift, scale (B, 1, C) fp32. Returns (B, L, C) in fp32, or in the input format of the
    linear it feeds (`out_dtype`, its `input_dtype()`): rounded to bf16/fp16, which the linear would cast to
    anyway (2 bytes an element written instead of 4, no separate cast), or, for FP8 linears (float8_e4m3fn),
    that fp32 result quantised per token as they would quantise it (fp8.QuantizedRows: 1 byte an element).
    Either way the numbers the GEMM multiplies are the ones the plain fp32 path gives it.
    """
    if out_dtype is None or out_dtype == torch.float32:
        return _dispatch("norm_modulate")(x, shift, scale, eps)
    if out_dtype == fp8.FP8:
        return fp8.QuantizedRows(*_dispatch("norm_modulate_quant")(x, shift, scale, eps))
    return _dispatch("norm_modulate")(x, shift, scale, eps, out_dtype)


def gelu_tanh(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor | fp8.QuantizedRows:
    """The FFN's GELU (tanh approximation) in x's dtype, as nn.GELU(approximate="tanh"). out_dtype: the input
    format of the linear it feeds; for an FP8 linear (float8_e4m3fn) the result comes quantised per token as
    that linear would quantise it (fp8.QuantizedRows; one Triton kernel: the activation is never written)."""
    if out_dtype == fp8.FP8:
        return fp8.QuantizedRows(*_dispatch("gelu_quant")(x))
    return F.gelu(x, approximate="tanh")


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int) -> torch.Tensor:
    """RMSNorm over the full width (fp32 statistics) * weight, split heads, interleaved RoPE.

    x (B, L, C) projection output; weight (C,); cos, sin (L, D/2). Returns fp32 (B, L, H, D).
    """
    return _dispatch("qk_norm_rope")(x, weight, eps, cos, sin, num_heads)


@register("torch", "norm_modulate")
def _norm_modulate_ref(x, shift, scale, eps, out_dtype=None):
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)
    out = y.float() * (1 + scale) + shift
    return out if out_dtype is None else out.to(out_dtype)


@register("torch", "gelu_quant")
def _gelu_quant_ref(x):
    return tuple(fp8.quantize(F.gelu(x, approximate="tanh")))


@register("torch", "norm_modulate_quant")
def _norm_modulate_quant_ref(x, shift, scale, eps):
    return tuple(fp8.quantize(_norm_modulate_ref(x, shift, scale, eps)))


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x (B, L, H, D) by per-token angles; fp32 result.

    cos, sin: (L, D // 2). Written with stack + flatten (no scatter) so it exports cleanly.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Official WanRMSNorm: statistics in fp32, rounded to x's dtype, then * weight (promotes)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


@register("torch", "qk_norm_rope")
def _qk_norm_rope_ref(x, weight, eps, cos, sin, num_heads):
    b, s, c = x.shape
    return rope_ref(rms_norm_ref(x, weight, eps).view(b, s, num_heads, c // num_heads), cos, sin)
