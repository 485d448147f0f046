"""Exact fusion of the DiT's projections, a load-time transform: linears that read the same input become
one GEMM over their concatenated weights, so the input is read (and, for FP8, quantised) once.

    self-attention   q, k, v (dim -> dim each) on x            -> qkv_proj (dim -> 3 dim)
    cross-attention  k, v on the text context                  -> kv_proj (dim -> 2 dim)
                     k_img, v_img on the image context         -> kv_img_proj (dim -> 2 dim)

Each output column is the same dot product as before (same weights, same input, same dtype), so the
result is the unfused one up to the GEMM library's choice of reduction blocking for the wider matrix
(fp32 CPU: rel. L2 <= 1e-6, tests/test_fusion.py). FP8Linears fuse exactly too: their scales are per
output channel, so the concatenated weight keeps every channel's scale, and the one per-token
activation scale is the same for all three.

The model code (wanrt/models/dit.py) uses a fused projection when the attention module has one; the
checkpoint keeps the official q/k/v names (the transform runs after loading, and drops the originals
so no weight is held twice).

`compile_blocks` is the other half of the issue's exact fusion, done by Inductor instead of by hand:
regional torch.compile of each DiT block, which fuses the elementwise work around the GEMMs (the norm's
cast to the matmul dtype, gate * y + residual, GELU and its cast) into the neighbouring kernels. All blocks
share one compiled graph (parameters are graph inputs; measured: one graph for the tiny DiT's 4 blocks), so
compiling costs one block, not forty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .fp8 import FP8Linear

# (module attribute of the fused projection, the official linears it replaces, in output order)
SELF_ATTENTION = ("qkv_proj", ("q", "k", "v"))
CROSS_ATTENTION = (("kv_proj", ("k", "v")), ("kv_img_proj", ("k_img", "v_img")))


@torch.no_grad()
def concat_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One Linear (or FP8Linear) whose output is the concatenation of `linears`' outputs on the same input."""
    first = linears[0]
    if any(type(m) is not type(first) for m in linears):
        raise TypeError(f"cannot fuse {[type(m).__name__ for m in linears]}: all must be the same kind")
    if any(m.in_features != first.in_features for m in linears):
        raise ValueError("fused linears must share their input width")
    has_bias = [m.bias is not None for m in linears]
    if any(has_bias) != all(has_bias):
        raise ValueError("fused linears must all have a bias or none")
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if all(has_bias) else None
    if isinstance(first, FP8Linear):
        if any(m.out_dtype != first.out_dtype for m in linears):
            raise ValueError("fused FP8 linears must share their output dtype")
        return FP8Linear(weight, torch.cat([m.weight_scale for m in linears]), bias, first.out_dtype)
    fused = type(first).__new__(type(first))  # same class (e.g. the DiT's dtype-casting Linear), no init
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features = first.in_features, weight.shape[0]
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return fused


def _fuse(module: nn.Module, attr: str, names: Sequence[str]) -> None:
    if hasattr(module, attr):
        return  # already fused
    fused = concat_linears([getattr(module, n) for n in names])
    for n in names:
        delattr(module, n)
    setattr(module, attr, fused)


def fuse_projections(dit: nn.Module) -> nn.Module:
    """In place: every block's self-attention q/k/v and cross-attention k/v (text and image) as one GEMM
    each. Run after loading (and after FP8 quantisation, which it preserves). Returns `dit`."""
    for block in dit.blocks:
        _fuse(block.self_attn, *SELF_ATTENTION)
        for attr, names in CROSS_ATTENTION:
            _fuse(block.cross_attn, attr, names)
    return dit


def is_fused(dit: nn.Module) -> bool:
    return any(hasattr(b.self_attn, SELF_ATTENTION[0]) for b in dit.blocks)


def compile_blocks(dit: nn.Module) -> nn.Module:
    """In place: every DiT block through torch.compile (Inductor), keeping each low-precision rounding of
    the eager block (emulate_precision_casts). Module names and the state dict are unchanged. Measured on the
    tiny DiT (CPU): fp32 rel. L2 3.5e-7 vs eager; bf16 4.1e-3 vs fp32 where eager bf16 is 4.0e-3
    (tests/test_fusion.py). The first call compiles (seconds for the tiny DiT on the CPU; not measured at 14B)."""
    for block in dit.blocks:
        block.compile(dynamic=False, options={"emulate_precision_casts": True})
    return dit


def is_compiled(dit: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in dit.blocks)
