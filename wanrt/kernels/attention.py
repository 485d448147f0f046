"""THE attention seam. Every attention in wanrt/models goes through `attention(q, k, v)`.

Layout (B, L, H, D), non-causal, softmax scale 1/sqrt(D). q and k are cast to v's dtype first
(the official `flash_attention` does the same), so in a bf16 model the attention runs in bf16 with
fp32 accumulation and in an fp32 model it runs in fp32. The output is cast back to q's original dtype,
as the official code does (the FLF2V cross-attention sums two attention outputs in that dtype).

Implementations are registered by name and chosen here and nowhere else:
- "sdpa" (default): torch.nn.functional.scaled_dot_product_attention.
- "math": q pre-scaled by 1/sqrt(D), then MatMul -> Softmax -> MatMul. This is the form the ONNX
  export uses, so TensorRT's attention fusion applies (it wants Q scaled before BMM1).
- Triton kernels ("flash", "sage") register themselves from wanrt.kernels when triton is present.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_REGISTRY: dict[str, AttentionFn] = {}
_state = threading.local()
_default = "sdpa"


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Register an attention implementation under `name` (decorator)."""

    def deco(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _load_optional()
    return sorted(_REGISTRY)


def current() -> str:
    return getattr(_state, "name", None) or _default


def set_default(name: str) -> None:
    """Select the process-wide attention implementation (e.g. from the CLI)."""
    global _default
    check(name)
    _default = name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Select an implementation for the current thread inside a `with` block."""
    check(name)
    prev = getattr(_state, "name", None)
    _state.name = name
    try:
        yield
    finally:
        _state.name = prev


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D) in `out_dtype`
    (default: q's dtype, as the official code). A caller whose next op casts to v's dtype anyway passes
    v.dtype: the same values without the round trip through fp32 (bf16 -> fp32 -> bf16 is exact)."""
    out_dtype = q.dtype if out_dtype is None else out_dtype
    q, k = q.to(v.dtype), k.to(v.dtype)
    return _REGISTRY[current()](q, k, v).to(out_dtype)


def check(name: str) -> None:
    _load_optional()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention implementation {name!r}; available: {', '.join(sorted(_REGISTRY))}")


def triton_unavailable(device: torch.device) -> str | None:
    """Why our Triton kernels cannot run on `device` (None: they can). On the CPU they run only under
    Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); elsewhere the ops would take
    their torch reference path, which a user asking for a kernel must hear about, not get silently."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1, Triton's slow CPU interpreter); "
            f"this pipeline runs on {device.type}")


_optional_loaded = False


def _load_optional() -> None:
    """Import the Triton kernels lazily so `import wanrt` never needs triton."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    with contextlib.suppress(ImportError):
        from . import ops  # noqa: F401  (registers "flash", "sage" when triton imports)


@register("sdpa")
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@register("math")
def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = (q * scale).transpose(1, 2)  # (B, H, Lq, D), pre-scaled for TensorRT's fused MHA
    scores = torch.matmul(q, k.permute(0, 2, 3, 1))  # (B, H, Lq, Lk)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)
