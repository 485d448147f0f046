"""TensorRT plugins for the wanrt ops, written with `tensorrt.plugin` (quickly deployable plugins).

Nothing here imports tensorrt until `register_plugins()` is called; the kernel-compilation helpers
below only need triton, so they can be checked without TensorRT (or a GPU: pass a `target`).

Plugins (namespace "wanrt"; the ONNX nodes from onnx_ops.py carry these names):

    FlashAttention(q, k, v) -> like q                      AOT (PTX) + JIT; tactics 1 (large tiles) and 2
    NormModulate(x, shift, scale; eps) -> fp32             AOT + JIT
    QKNormRope(x, weight, cos, sin; eps, num_heads) -> fp32 (B, L, H, D)   AOT + JIT
    SageAttention(q, k, v) -> like q                       JIT only: it is four kernels (quantise Q, K, V,
                                                            then attend) and an AOT plugin is one kernel

AOT kernels follow the QDP launch convention: kernel(input pointers..., int32 scalars..., output
pointers...), the scalars given as symbolic shape expressions resolved at run time, grid/block/shared
memory in `trtp.KernelLaunchParams`. The Triton kernels' argument order was chosen for this. An AOT
plugin is baked into the engine (no Python at run time, CUDA-graph safe); a JIT plugin calls back
into Python (torch + the Triton launcher) on the engine's stream.

Not verified here (no TensorRT, no GPU on the machine this was written on) - to check on the first
TensorRT-capable GPU machine (tests/test_kernels.py has the GPU/TensorRT tests):
- Triton >= 3.3 kernels take two trailing hidden pointer parameters (global and profile scratch;
  our kernels use neither, `compile_kernel` asserts it). The QDP launcher must pass them (as null) or
  the launch reads past its argument array.
- Tactic 1 of FlashAttention needs > 48 KB of dynamic shared memory (which needs an opt-in attribute
  on the kernel); tactic 2 fits in 48 KB, so the build still has a working tactic if the opt-in is
  not done.
- ONNX float attributes arrive as FLOAT32 plugin fields while `float` attributes serialise as FLOAT64.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the decorated
# functions as objects (TensorDesc inputs vs attributes, the aot_impl return type).
import functools
import math
from collections.abc import Iterable

import torch

NAMESPACE = "wanrt"

# ---------------------------------------------------------------------------------------------------
# Kernel compilation (triton only)

# Tile configurations per tactic: 1 = throughput (pipelined K/V ring, > 48 KB shared memory on
# sm80/sm90), 2 = small (single stage, <= 48 KB, no opt-in needed). fp32 inputs take half-size tiles.
FLASH_TACTICS = {
    1: {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3},
    2: {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1},
}
FLASH_TACTICS_FP32 = {
    1: {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 2},
    2: {"BLOCK_M": 32, "BLOCK_N": 16, "num_stages": 1},
}


def compile_kernel(kernel, pointer_types: dict[str, str], constexprs: dict, *, num_warps: int,
                   num_stages: int, aligned: Iterable[str] = (), target=None):
    """triton.compile one kernel ahead of time.

    pointer_types: {arg: "*bf16" | "*fp32" | ...}; every other non-constexpr argument is an int32.
    aligned: arguments promised divisible by 16 (pointers: 16-byte aligned; ints: multiples of 16).
    Without that promise Triton cannot vectorise or pipeline the loads (cp.async needs it), which
    JIT launches get automatically by specialising on the actual values.
    """
    import triton

    if not hasattr(kernel, "arg_names"):
        raise RuntimeError("AOT compilation needs compiled Triton kernels; unset TRITON_INTERPRET")
    names = kernel.arg_names
    signature = {n: pointer_types.get(n, "i32") for n in names}
    for n in constexprs:
        signature[n] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    options = triton.compiler.make_backend(target).parse_options({"num_warps": num_warps,
                                                                  "num_stages": num_stages})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise RuntimeError(f"{md.name} needs Triton scratch memory, which QDP AOT plugins cannot provide")
    return compiled


def flash_kernel(dtype: str, d: int, tactic: int, target=None):
    """(compiled, BLOCK_M) for FlashAttention; dtype "bf16" | "fp16" | "fp32", d = head dim."""
    from .triton_attention import LOG2E, block_d, flash_fwd_kernel

    cfg = (FLASH_TACTICS_FP32 if dtype == "fp32" else FLASH_TACTICS)[tactic]
    bd = block_d(d)
    warps = 8 if (cfg["BLOCK_M"] >= 128 and bd > 64) else 4
    ptr = f"*{dtype}"
    strides = ["sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "sob", "sol", "soh"]
    aligned = ["q_ptr", "k_ptr", "v_ptr", "o_ptr"] + (strides if d % 16 == 0 else [])
    compiled = compile_kernel(
        flash_fwd_kernel, {n: ptr for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")},
        {"D": d, "BLOCK_D": bd, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
         "QK_SCALE": LOG2E / math.sqrt(d), "PRECISION": "ieee" if dtype == "fp32" else "tf32",
         "EMULATE": False},
        num_warps=warps, num_stages=cfg["num_stages"], aligned=aligned, target=target)
    return compiled, cfg["BLOCK_M"]


def norm_modulate_kernel(dtype: str, c: int, eps: float, target=None):
    """Compiled NormModulate kernel for x of triton dtype `dtype` and width c."""
    import triton

    from .triton_fused import norm_modulate_kernel as kernel

    block = triton.next_power_of_2(c)
    return compile_kernel(
        kernel, {"x_ptr": f"*{dtype}", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32"},
        {"EPS": float(eps), "BLOCK_C": block, "EMULATE": False},
        num_warps=min(max(block // 256, 1), 8), num_stages=1,
        aligned=["x_ptr", "shift_ptr", "scale_ptr", "out_ptr"], target=target)


def qk_norm_rope_kernel(dtype: str, w_dtype: str, c: int, eps: float, target=None):
    """Compiled QKNormRope kernel for x / weight of triton dtypes `dtype` / `w_dtype`, width c."""
    import triton

    from .triton_fused import qk_norm_rope_kernel as kernel

    # x * weight is rounded to promote_types(x, weight): the common dtype if equal, else fp32
    prod = {"fp32": 0, "fp16": 1, "bf16": 2}[dtype] if dtype == w_dtype else 0
    block_p = triton.next_power_of_2(c // 2)
    return compile_kernel(
        kernel,
        {"x_ptr": f"*{dtype}", "w_ptr": f"*{w_dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
         "out_ptr": "*fp32"},
        {"EPS": float(eps), "BLOCK_P": block_p, "PROD_CODE": prod, "EMULATE": False},
        num_warps=min(max(2 * block_p // 256, 1), 8), num_stages=1,
        aligned=["x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "out_ptr"], target=target)


# ---------------------------------------------------------------------------------------------------
# Plugin definitions (tensorrt)


class _BF16View:
    """__cuda_array_interface__ has no bf16: expose the buffer as int16 and view it as bf16 in torch."""

    def __init__(self, t):
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2",
                                         "data": (t.data_ptr, False), "version": 3, "strides": None}


@functools.cache
def register_plugins() -> None:
    """Define the wanrt::* plugins in TensorRT's plugin registry (once per process). Imports tensorrt."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from . import triton_attention, triton_fused, triton_sage

    triton_dtype = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    has_aot = hasattr(trtp, "aot_impl")  # TensorRT >= 10.9

    def as_torch(t) -> torch.Tensor:
        if t.dtype == trt.bfloat16:
            return torch.as_tensor(_BF16View(t), device="cuda").view(torch.bfloat16)
        return torch.as_tensor(t, device="cuda")

    def constant(e, what: str) -> int:
        if not e.is_constant:
            raise ValueError(f"wanrt plugins need a build-time constant {what}")
        return e.constant_value()

    def launch_params(compiled, grid_x, grid_y=1):
        p = trtp.KernelLaunchParams()
        p.grid_x = grid_x
        p.grid_y = grid_y
        p.block_x = compiled.metadata.num_warps * 32
        p.shared_mem = compiled.metadata.shared
        return p

    def ints(*exprs):
        return trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in exprs])

    aot_return = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    # --- FlashAttention: q (B, Lq, H, D), k/v (B, Lk, H, D), contiguous ---------------------------
    @trtp.register(f"{NAMESPACE}::FlashAttention")
    def _flash_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(f"{NAMESPACE}::FlashAttention")
    def _flash_tune(q, k, v, outputs):
        return [trtp.AutoTuneCombination("BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32, BF16|FP16|FP32",
                                         "LINEAR", sorted(FLASH_TACTICS))]

    if has_aot:
        @trtp.aot_impl(f"{NAMESPACE}::FlashAttention")
        def _flash_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                       outputs: tuple[trtp.TensorDesc], tactic: int) -> aot_return:
            b, lq, h, d_expr = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], q.shape_expr[3]
            lk = k.shape_expr[1]
            d = constant(d_expr, "head dim")
            compiled, block_m = flash_kernel(triton_dtype[q.dtype], d, tactic or 1)
            hd = h * d
            args = ints(lq, lk, h, lq * hd, hd, d, lk * hd, hd, d, lk * hd, hd, d, lq * hd, hd, d)
            return (compiled.metadata.name, compiled.asm["ptx"],
                    launch_params(compiled, trtp.cdiv(lq, block_m), b * h), args)

    @trtp.impl(f"{NAMESPACE}::FlashAttention")
    def _flash_jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, outputs: tuple[trtp.Tensor],
                   stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = triton_attention.flash_attention(as_torch(q), as_torch(k), as_torch(v))
            as_torch(outputs[0]).copy_(out)

    # --- SageAttention (JIT) -------------------------------------------------------------------------
    @trtp.register(f"{NAMESPACE}::SageAttention")
    def _sage_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc) -> trtp.TensorDesc:
        return q.like()

    @trtp.impl(f"{NAMESPACE}::SageAttention")
    def _sage_jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, outputs: tuple[trtp.Tensor],
                  stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = triton_sage.sage_attention(as_torch(q), as_torch(k), as_torch(v), pv="auto")
            as_torch(outputs[0]).copy_(out)

    # --- NormModulate: x (B, L, C), shift/scale (B or 1, 1, C) fp32 -> fp32 ---------------------------
    @trtp.register(f"{NAMESPACE}::NormModulate")
    def _nm_desc(x: trtp.TensorDesc, shift: trtp.TensorDesc, scale: trtp.TensorDesc,
                 eps: float) -> trtp.TensorDesc:
        return trtp.from_shape_expr(x.shape_expr, dtype=trt.float32)

    if has_aot:
        @trtp.aot_impl(f"{NAMESPACE}::NormModulate")
        def _nm_aot(x: trtp.TensorDesc, shift: trtp.TensorDesc, scale: trtp.TensorDesc, eps: float,
                    outputs: tuple[trtp.TensorDesc], tactic: int) -> aot_return:
            b, l, c_expr = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
            c = constant(c_expr, "hidden size")
            compiled = norm_modulate_kernel(triton_dtype[x.dtype], c, eps)

            def batch_stride(t):  # a batch-1 shift/scale broadcasts over x's batch
                e = t.shape_expr[0]
                return 0 if (e.is_constant and e.constant_value() == 1) else c

            args = ints(l, c, l * c, c, batch_stride(shift), batch_stride(scale))
            return compiled.metadata.name, compiled.asm["ptx"], launch_params(compiled, b * l), args

    @trtp.impl(f"{NAMESPACE}::NormModulate")
    def _nm_jit(x: trtp.Tensor, shift: trtp.Tensor, scale: trtp.Tensor, eps: float,
                outputs: tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = triton_fused.norm_modulate(as_torch(x), as_torch(shift), as_torch(scale), eps)
            as_torch(outputs[0]).copy_(out)

    # --- QKNormRope: x (B, L, C), weight (C,), cos/sin (L, D/2) fp32 -> fp32 (B, L, H, D) -------------
    @trtp.register(f"{NAMESPACE}::QKNormRope")
    def _qk_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                 eps: float, num_heads: int) -> trtp.TensorDesc:
        b, l, c = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        return trtp.from_shape_expr((b, l, num_heads, c // num_heads), dtype=trt.float32)

    if has_aot:
        @trtp.aot_impl(f"{NAMESPACE}::QKNormRope")
        def _qk_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                    eps: float, num_heads: int, outputs: tuple[trtp.TensorDesc], tactic: int) -> aot_return:
            b, l, c_expr = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
            c = constant(c_expr, "hidden size")
            half_d = c // (2 * num_heads)
            compiled = qk_norm_rope_kernel(triton_dtype[x.dtype], triton_dtype[weight.dtype], c, eps)
            args = ints(l, c, half_d, l * c, c, half_d)
            return compiled.metadata.name, compiled.asm["ptx"], launch_params(compiled, b * l), args

    @trtp.impl(f"{NAMESPACE}::QKNormRope")
    def _qk_jit(x: trtp.Tensor, weight: trtp.Tensor, cos: trtp.Tensor, sin: trtp.Tensor, eps: float,
                num_heads: int, outputs: tuple[trtp.Tensor], stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = triton_fused.qk_norm_rope(as_torch(x), as_torch(weight), eps, as_torch(cos), as_torch(sin),
                                            num_heads)
            as_torch(outputs[0]).copy_(out)
