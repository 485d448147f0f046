"""ONNX export of the wanrt ops as custom-domain nodes that TensorRT maps to our plugins.

With `custom_ops=True`, every `wanrt::*` op in the traced graph becomes one node in domain "wanrt":

    wanrt::FlashAttention(q, k, v)                                  plugin_namespace="wanrt", aot=1
    wanrt::SageAttention(q, k, v)                                   plugin_namespace="wanrt"
    wanrt::NormModulate(x, shift, scale; eps)                       plugin_namespace="wanrt", aot=1
    wanrt::QKNormRope(x, weight, cos, sin; eps, num_heads)          plugin_namespace="wanrt", aot=1

TensorRT's ONNX parser looks a plugin up by the node's op_type (= plugin name), the string attribute
`plugin_namespace`, and takes the AOT implementation when the node carries `aot=1`; remaining attributes
are passed to the plugin by name (trt_plugins.py defines the plugins with these names). SageAttention
has no `aot`: it is four kernels, and an AOT plugin is one kernel, so TensorRT runs its Python (JIT)
implementation.

ONNX Runtime cannot run these nodes; graphs meant for ORT are exported from the default seams
("sdpa"/"math" attention, "torch" fused kernels), which yield plain ONNX ops - the path used when no
Triton kernel is selected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

DOMAIN = "wanrt"
OP_TYPES = {
    "flash_attention": "FlashAttention",
    "sage_attention": "SageAttention",
    "norm_modulate": "NormModulate",
    "qk_norm_rope": "QKNormRope",
}


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
ONNX_TYPES = {torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto.FLOAT16 / BFLOAT16


def register_schemas() -> None:
    """Declare the wanrt ops to onnx (idempotent). The exporter builds nodes through onnxscript, which
    needs an OpSchema for every op it emits; the schemas also give the checker and shape inference
    the output types (attention: like q; the fused ops: fp32)."""
    import onnx
    from onnx.defs import OpSchema

    def param(name: str, type_str: str) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, type_str)

    def attr(name: str, kind: OpSchema.AttrType, doc: str) -> OpSchema.Attribute:
        return OpSchema.Attribute(name, kind, doc, required=False)

    common = [attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
              attr("aot", OpSchema.AttrType.INT, "1: TensorRT uses the plugin's AOT (PTX) implementation")]
    eps = attr("eps", OpSchema.AttrType.FLOAT, "normalisation epsilon")
    float_t = ("T", _FLOATS, "activation dtype")
    fp32_t = ("F", ["tensor(float)"], "fp32")
    schemas = [
        OpSchema("FlashAttention", DOMAIN, 1, inputs=[param(n, "T") for n in "qkv"],
                 outputs=[param("out", "T")], type_constraints=[float_t], attributes=common,
                 doc="softmax(q k^T / sqrt(D)) v; q (B, Lq, H, D), k/v (B, Lk, H, D)"),
        OpSchema("SageAttention", DOMAIN, 1, inputs=[param(n, "T") for n in "qkv"],
                 outputs=[param("out", "T")], type_constraints=[float_t], attributes=common,
                 doc="INT8 Q.K^T, FP8/FP16 P.V attention; q (B, Lq, H, D), k/v (B, Lk, H, D)"),
        OpSchema("NormModulate", DOMAIN, 1,
                 inputs=[param("x", "T"), param("shift", "F"), param("scale", "F")],
                 outputs=[param("out", "F")],
                 type_constraints=[float_t, fp32_t], attributes=[*common, eps],
                 doc="LayerNorm(x) * (1 + scale) + shift; x (B, L, C), shift/scale (B, 1, C) -> fp32"),
        OpSchema("QKNormRope", DOMAIN, 1,
                 inputs=[param("x", "T"), param("weight", "W"), param("cos", "F"), param("sin", "F")],
                 outputs=[param("out", "F")],
                 type_constraints=[float_t, ("W", _FLOATS, "weight dtype"), fp32_t],
                 attributes=[*common, eps, attr("num_heads", OpSchema.AttrType.INT, "heads H")],
                 doc="RMSNorm(x) * weight, heads, interleaved RoPE; x (B, L, C) -> fp32 (B, L, H, C/H)"),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, DOMAIN):
            onnx.defs.register_schema(schema)


def translation_table() -> dict[Callable, Callable]:
    """{torch op overload: onnxscript function emitting the custom node} for torch.onnx.export."""
    from onnxscript import opset18 as onnx_op
    from onnxscript import values

    from . import ops  # noqa: F401  (defines torch.ops.wanrt.*; needs triton)

    register_schemas()
    wanrt = values.Opset(DOMAIN, 1)

    def flash_attention(q, k, v):
        return wanrt.FlashAttention(q, k, v, plugin_namespace=DOMAIN, aot=1)

    def sage_attention(q, k, v):
        return wanrt.SageAttention(q, k, v, plugin_namespace=DOMAIN)

    def norm_modulate(x, shift, scale, eps: float, out_dtype=torch.float32):
        out = wanrt.NormModulate(x, shift, scale, eps=float(eps), plugin_namespace=DOMAIN, aot=1)
        if out_dtype in (None, torch.float32):
            return out
        # the plugin writes fp32; the rounding to the linear's dtype stays an explicit Cast in the graph
        return onnx_op.Cast(out, to=ONNX_TYPES[out_dtype])

    def qk_norm_rope(x, weight, eps: float, cos, sin, num_heads: int):
        return wanrt.QKNormRope(x, weight, cos, sin, eps=float(eps), num_heads=int(num_heads),
                                plugin_namespace=DOMAIN, aot=1)

    w = torch.ops.wanrt
    return {
        w.flash_attention.default: flash_attention,
        w.sage_attention.default: sage_attention,
        w.norm_modulate.default: norm_modulate,
        w.qk_norm_rope.default: qk_norm_rope,
    }


def export(model: torch.nn.Module, args: tuple[Any, ...], f: str | os.PathLike | None = None, *,
           custom_ops: bool = True, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, **kwargs: Any) -> torch.onnx.ONNXProgram:
    """torch.onnx.export (dynamo) with the wanrt custom-node translations when `custom_ops`.

    The graph contains wanrt nodes only where the model called a wanrt op, i.e. where a Triton
    implementation was selected in the seams while tracing.
    """
    table = translation_table() if custom_ops else None
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table,
                             input_names=input_names, output_names=output_names, **kwargs)


def custom_nodes(model_proto) -> list:
    """The wanrt-domain nodes of an onnx.ModelProto (top-level graph)."""
    return [n for n in model_proto.graph.node if n.domain == DOMAIN]
