"""Graph -> ONNX without holding the model twice.

1. The export module is built on the meta device and traced by the dynamo exporter (no weights).
2. Every weight/buffer initializer is turned into a graph input, so the optimizer can simplify the
   graph (Split instead of SplitToSequence, folded shape arithmetic) without touching weights: no
   transposed copies, every weight keeps its module name.
3. The inputs are turned back into initializers whose bytes are streamed one tensor at a time from
   the checkpoint (cast to the graph's dtype) into the model file, or into `<file>.data` (external
   data) when they exceed `inline_limit` (default 1.9 GB; protobuf cannot hold 2 GB).
Files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .specs import GraphSpec

OPSET = 20  # TensorRT 10.x parses opsets 9..20; 11.x up to 25
ATTENTION_OPSET = 23  # the ONNX `Attention` op (TensorRT parses it since 10.14, as IAttention)

# How attention appears in the exported graph (`wanrt export --graph_attention`):
# - "matmul" (default): q pre-scaled by 1/sqrt(D), then MatMul -> Softmax -> MatMul in the graph's dtype,
#   with no Cast between them, the pattern TensorRT's Myelin matcher fuses into one attention kernel (a
#   Cast island MatMul -> Cast(fp32) -> Softmax -> Cast(bf16) -> MatMul is not guaranteed to fuse, and
#   unfused the 720p score tensor is ~1.8 TB). TensorRT's fused kernels accumulate softmax in fp32.
# - "onnx": the opset-23 `Attention` op (q pre-scaled, scale=1), which TensorRT >= 10.14 maps to IAttention
#   (NVIDIA's Wan demo exports this form). Applied to the DiT; the other graphs stay opset 20.
# - "flash" | "sage": our Triton kernels as custom nodes wanrt::FlashAttention / wanrt::SageAttention
#   (kernels/onnx_ops.py), which `wanrt build` maps to our TensorRT plugins. ONNX Runtime runs them through
#   `with_reference_functions`, an ONNX function per op with the exact attention as its body.
GRAPH_ATTENTION = ("matmul", "onnx", "flash", "sage")
PLUGIN_FORMS = ("flash", "sage")


def _cast_free_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import math

    q = (q * (1.0 / math.sqrt(q.shape[-1]))).transpose(1, 2)  # (B, H, Lq, D), pre-scaled
    scores = torch.matmul(q, k.permute(0, 2, 3, 1))  # (B, H, Lq, Lk)
    return torch.matmul(torch.softmax(scores, dim=-1), v.transpose(1, 2)).transpose(1, 2)


def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import math

    import torch.nn.functional as F

    q = q * (1.0 / math.sqrt(q.shape[-1]))  # TensorRT wants Q pre-scaled before BMM1
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0)
    return out.transpose(1, 2)


def _register_forms() -> dict[str, str]:
    """The export-only attention implementations, registered in the attention seam under private names."""
    from wanrt.kernels import attention

    attention.register("_export_matmul")(_cast_free_math)
    attention.register("_export_onnx")(_attention_op)
    return {"matmul": "_export_matmul", "onnx": "_export_onnx", "flash": "flash", "sage": "sage"}


def _plugin_table(graph_attention: str):
    """The custom-node translations for the plugin forms (needs triton: the ops are Triton kernels)."""
    if graph_attention not in PLUGIN_FORMS:
        return None
    try:
        from wanrt.kernels import onnx_ops

        return onnx_ops.translation_table()
    except ImportError as e:
        raise ImportError(f"--graph_attention {graph_attention} exports our Triton kernels as custom nodes and "
                          f"needs triton ({e}); pip install triton, or use matmul/onnx") from None


def with_reference_functions(proto):
    """`proto` with an ONNX function per wanrt attention node type, whose body is the exact attention
    (q, k, v (B, L, H, D) -> softmax(q k^T / sqrt(D)) v) in standard ops, so ONNX Runtime (and the checker)
    can run a graph exported with --graph_attention flash|sage. The TensorRT build uses the plugins instead;
    this reference is never written into the engine dir's ONNX."""
    from onnx import helper

    from wanrt.kernels import onnx_ops

    used = {n.op_type for n in proto.graph.node if n.domain == onnx_ops.DOMAIN}
    have = {f.name for f in proto.functions}
    for op in sorted(used - have):
        if op not in ("FlashAttention", "SageAttention"):
            raise ValueError(f"no ONNX Runtime reference for the custom node wanrt::{op}")
        nodes = [
            helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1, 3]),
            helper.make_node("Shape", ["q"], ["d"], start=3, end=4),
            helper.make_node("CastLike", ["d", "q"], ["df"]),
            helper.make_node("Sqrt", ["df"], ["sd"]),
            helper.make_node("Div", ["qt", "sd"], ["qs"]),
            helper.make_node("MatMul", ["qs", "kt"], ["s"]),
            helper.make_node("Softmax", ["s"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "vt"], ["o"]),
            helper.make_node("Transpose", ["o"], ["out"], perm=[0, 2, 1, 3]),
        ]
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        proto.functions.append(helper.make_function(onnx_ops.DOMAIN, op, ["q", "k", "v"], ["out"], nodes,
                                                    [helper.make_opsetid("", opset)]))
    return proto
INLINE_LIMIT = 1_900_000_000
_ALIGN = 64

_TORCH_TO_ONNX = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
                  torch.float16: 10, torch.float64: 11, torch.bfloat16: 16, torch.float8_e4m3fn: 17}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a CPU tensor (bf16 and fp8 via an integer view)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def trace(module: torch.nn.Module, spec: GraphSpec, args: tuple, opset: int | None = None,
          graph_attention: str = "matmul"):
    """Dynamo-export `module` (meta weights) -> optimised ModelProto whose weights are graph inputs.
    graph_attention: how attention appears in the graph (GRAPH_ATTENTION); "onnx" implies opset 23.

    Returns (ModelProto, weight_names): weight_names are the weight inputs (module FQNs) still used.
    """
    import onnxscript.optimizer

    from wanrt.kernels import attention, fused

    if graph_attention not in GRAPH_ATTENTION:
        raise ValueError(f"graph attention must be one of {', '.join(GRAPH_ATTENTION)}, got {graph_attention!r}")
    impl = _register_forms()[graph_attention]
    table = _plugin_table(graph_attention)
    opset = opset or (ATTENTION_OPSET if graph_attention == "onnx" else OPSET)
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    with warnings.catch_warnings(), _quiet(), attention.use(impl), fused.use("torch"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names_in,
                                    output_names=names_out, optimize=False, verbose=False,
                                    custom_translation_table=table)
    model = program.model
    weights = list(model.graph.initializers)
    for name in weights:  # weights become inputs: the optimizer must not fold (or read) them
        value = model.graph.initializers.pop(name)
        value.const_value = None
        model.graph.inputs.append(value)
    onnxscript.optimizer.optimize_ir(model, onnx_shape_inference=False)
    used = {v.name for node in model.graph for v in node.inputs if v is not None}
    model.graph.inputs[:] = [v for v in model.graph.inputs if v.name in names_in or v.name in used]
    weights = [w for w in weights if w in used]
    if [v.name for v in model.graph.inputs][: len(names_in)] != names_in:
        raise RuntimeError(f"exported inputs {[v.name for v in model.graph.inputs]} do not start with {names_in}")
    from onnxscript import ir

    return ir.serde.serialize_model(model), weights


def write(proto, weights: list[str], fetch: Callable[[str], torch.Tensor], path: Path,
          inline_limit: int = INLINE_LIMIT) -> dict:
    """Attach the weights (graph inputs of `proto`, fetched one by one, cast to the graph's dtype) as
    initializers and save `path` atomically. Returns {"files": [...], "bytes": total weight bytes}.
    """
    import onnx

    graph = proto.graph
    by_name = {i.name: i for i in graph.input}
    # shapes/dtypes the graph expects for each weight
    expect = {}
    for name in weights:
        tt = by_name[name].type.tensor_type
        expect[name] = (tt.elem_type, tuple(d.dim_value for d in tt.shape.dim))
    total = 0
    metas = {}
    for name in weights:  # first pass: sizes only (cheap), to decide inline vs external
        elem, shape = expect[name]
        metas[name] = (elem, shape)
        total += int(np.prod(shape, dtype=np.int64)) * _itemsize(elem)
    external = total > inline_limit
    path = Path(path)
    data_name = path.name + ".data"
    tmp_model = path.with_name(f".{path.name}.tmp")
    tmp_data = path.with_name(f".{data_name}.tmp")
    inits = []
    try:
        fh = open(tmp_data, "wb") if external else None  # noqa: SIM115 - closed in the finally below
        try:
            offset = 0
            for name in weights:
                elem, shape = metas[name]
                t = fetch(name).to(_ONNX_TO_TORCH[elem])
                if tuple(t.shape) != shape:
                    raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, the graph expects {shape}")
                tp = onnx.TensorProto(name=name, data_type=elem, dims=list(shape))
                raw = tensor_bytes(t)
                del t
                if fh is None:
                    tp.raw_data = raw
                else:
                    pad = (-offset) % _ALIGN
                    fh.write(b"\0" * pad)
                    offset += pad
                    fh.write(raw)
                    tp.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                        entry = tp.external_data.add()
                        entry.key, entry.value = key, value
                    offset += len(raw)
                inits.append(tp)
        finally:
            if fh is not None:
                fh.close()
        keep = [i for i in graph.input if i.name not in expect]
        del graph.input[:]
        graph.input.extend(keep)
        graph.initializer.extend(inits)
        with open(tmp_model, "wb") as f:
            f.write(proto.SerializeToString())
        if external:
            os.replace(tmp_data, path.with_name(data_name))
        elif path.with_name(data_name).exists():
            path.with_name(data_name).unlink()  # a stale data file from an earlier external export
        os.replace(tmp_model, path)
    finally:
        for p in (tmp_model, tmp_data):
            p.unlink(missing_ok=True)
    files = [path.name] + ([data_name] if external else [])
    return {"files": files, "bytes": total}


_ONNX_TO_TORCH = {v: k for k, v in _TORCH_TO_ONNX.items()}


def _itemsize(elem: int) -> int:
    return {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 17: 1}[elem]


class _quiet:
    """Silence the exporter's progress prints and logger chatter."""

    def __enter__(self):
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        logging.disable(self._level)
        return False


# ------------------------------------------------------------------------------------------- checks


def trt_supported_ops() -> set[str]:
    """Operators the TensorRT ONNX parser accepts (wanrt/export/trt_ops.txt, from onnx-tensorrt)."""
    text = (Path(__file__).with_name("trt_ops.txt")).read_text()
    return {line.split("\t")[0] for line in text.splitlines() if line and not line.startswith("#")}


def check_graph(path: Path) -> dict:
    """onnx.checker, no complex/float64 tensors, static shapes, every op in TensorRT's list. Raises."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(n.domain == "wanrt" for n in model.graph.node):
        from wanrt.kernels import onnx_ops

        onnx_ops.register_schemas()  # the custom nodes validate against our schemas
    onnx.checker.check_model(str(path))
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    unsupported = sorted(op for dom, op in ops if dom == "ai.onnx" and op not in trt_supported_ops())
    if unsupported:
        raise ValueError(f"{path.name}: operators TensorRT cannot parse: {unsupported}")
    bad_types = {11: "float64", 14: "complex64", 15: "complex128"}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        t = vi.type.tensor_type
        if t.elem_type in bad_types:
            raise ValueError(f"{path.name}: tensor {vi.name!r} is {bad_types[t.elem_type]}")
        if any(not d.HasField("dim_value") for d in t.shape.dim):
            raise ValueError(f"{path.name}: tensor {vi.name!r} has a dynamic dimension")
    for init in model.graph.initializer:
        if init.data_type in bad_types:
            raise ValueError(f"{path.name}: initializer {init.name!r} is {bad_types[init.data_type]}")
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in bad_types:
                raise ValueError(f"{path.name}: constant in node {node.name!r} is {bad_types[attr.t.data_type]}")
    return {"ops": sorted(op for _, op in ops), "nodes": len(model.graph.node)}
