"""FP8 (E4M3) for the DiT: "max" calibration on real denoising steps, then explicit Q/DQ in the graph.

Our own small pass (NVIDIA ModelOpt is not installable on these machines): per-tensor scales
amax / 448 for every linear of the attention blocks (self-attention q/k/v/o, cross-attention
q/k/v/o/k_img/v_img, FFN up/down). Patch embedding, time/text/image embedders and the head stay in
high precision, as in NVIDIA's Wan recipe. In the graph each quantised linear becomes

    x (bf16) -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(s_w) <- W^T (fp8)

with the weight stored pre-transposed ([in, out], as ModelOpt does), so DequantizeLinear feeds the
MatMul directly: the pattern TensorRT's strongly typed builder folds into one FP8 GEMM (a Transpose
between DQ and MatMul is an extra layer it may not fold). `fake_quant` applies the
same scales to a PyTorch model, which is how the FP8 error is measured where no FP8 runtime exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanrt.models.dit import Linear

FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZED = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.[02])$")


def quantized_linears(dit: nn.Module) -> list[str]:
    return [n for n, m in dit.named_modules() if isinstance(m, Linear) and QUANTIZED.match(n)]


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """round-to-nearest E4M3 with saturation, back to x's dtype: what QuantizeLinear/DequantizeLinear do."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


# --------------------------------------------------------------------------------------------- recipe
# Calibration itself runs the pipeline, so it lives above it (wanrt/calibration.py); this module only
# says which linears are quantised and how, and rewrites the graph.

EDGE_BLOCKS = 3  # NVIDIA's Wan FP8 filter keeps blocks 0-2 and the last three (37-39 of 40) in bf16


def recipe_linears(dit: nn.Module, recipe: str = "nvidia") -> list[str]:
    """The linears the recipe quantises. 'nvidia' (default): every block linear except those of the
    first and last EDGE_BLOCKS blocks (the most sensitive ones); 'all': every block linear. A model with
    too few blocks to spare six (the tiny test model) is quantised whole, and says so in the table."""
    names = quantized_linears(dit)
    if recipe == "all":
        return names
    if recipe != "nvidia":
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose nvidia or all")
    keep = excluded_blocks(dit.cfg.num_layers)
    return [n for n in names if int(n.split(".")[1]) not in keep]


def excluded_blocks(num_layers: int) -> list[int]:
    """Blocks the 'nvidia' recipe keeps in bf16: 0..2 and the last three, when at least one block remains."""
    if num_layers <= 2 * EDGE_BLOCKS:
        return []
    return [*range(EDGE_BLOCKS), *range(num_layers - EDGE_BLOCKS, num_layers)]


def scales(calibration: dict) -> dict[str, tuple[float, float]]:
    """name -> (activation scale, weight scale), never zero."""
    def s(v: float) -> float:
        return max(v, 1e-12) / FP8_MAX

    return {n: (s(a), s(calibration["weight_amax"][n])) for n, a in calibration["activation_amax"].items()}


class FakeQuantLinear(nn.Module):
    """Linear whose input and weight go through E4M3 with fixed per-tensor scales."""

    def __init__(self, linear: Linear, s_x: float, s_w: float):
        super().__init__()
        self.linear, self.s_x, self.s_w = linear, s_x, s_w

    def forward(self, x):
        w = fake_quant(self.linear.weight, self.s_w)
        return F.linear(fake_quant(x.to(w.dtype), self.s_x), w, self.linear.bias)


def fake_quant_model(dit: nn.Module, calibration: dict) -> nn.Module:
    """`dit` with every quantised linear replaced by FakeQuantLinear (in place; returns it)."""
    for name, (s_x, s_w) in scales(calibration).items():
        parent, _, attr = name.rpartition(".")
        owner = dit.get_submodule(parent)
        setattr(owner, attr, FakeQuantLinear(getattr(owner, attr), s_x, s_w))
    return dit


# ----------------------------------------------------------------------------------------- Q/DQ graph


def insert_qdq(proto, weights: list[str], fetch: Callable[[str], torch.Tensor], calibration: dict,
               attention: bool = False):
    """Rewrite the DiT graph (weights as graph inputs named net.<module>.weight) with FP8 Q/DQ on every
    calibrated linear. Returns (proto, weights, fetch) where quantised weights are FP8 inputs that
    `fetch` produces by quantising the checkpoint tensor with the calibrated weight scale."""
    import onnx
    from onnx import TensorProto, helper

    graph = proto.graph
    table = scales(calibration)
    inputs = {i.name: i for i in graph.input}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    new_nodes_before: dict[int, list] = {}  # id(node) -> nodes to insert before it
    dropped: set[int] = set()  # the weight Transposes, folded into the stored weight
    fp8_names = {}
    for name, (s_x, s_w) in table.items():
        w = f"net.{name}.weight"
        if w not in inputs:
            raise ValueError(f"calibrated linear {name} is not in the graph (calibration for another model?)")
        elem = inputs[w].type.tensor_type.elem_type  # bf16 (or fp32): the matmul's dtype
        np_dtype = {TensorProto.BFLOAT16: torch.bfloat16, TensorProto.FLOAT: torch.float32}[elem]
        # the weight input becomes FP8 (renamed; its bytes come from fetch_fp8 below)
        wq = f"{w}_fp8"
        fp8_names[wq] = (w, s_w)
        inputs[w].name = wq
        inputs[w].type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
        sw, sx, zp = f"{w}_scale", f"net.{name}.input_scale", f"net.{name}.input_zero_point"
        graph.initializer.extend([_scalar(sw, s_w, elem, np_dtype), _scalar(sx, s_x, elem, np_dtype),
                                  helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0])])
        transposes = consumers.get(w, [])
        if len(transposes) != 1:
            raise ValueError(f"{w}: expected one consumer, found {[n.op_type for n in transposes]}")
        t_node = transposes[0]
        mm = consumers.get(t_node.output[0], [])
        perm = next((list(a.ints) for a in t_node.attribute if a.name == "perm"), [1, 0])
        if t_node.op_type != "Transpose" or perm != [1, 0] or len(mm) != 1 or mm[0].op_type != "MatMul":
            raise ValueError(f"{w}: expected Transpose -> MatMul, found {t_node.op_type} -> "
                             f"{[n.op_type for n in mm]}")
        # weight: stored transposed ([in, out]) in FP8 -> DequantizeLinear -> MatMul; the Transpose goes
        dims = inputs[w].type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
        dq_w = helper.make_node("DequantizeLinear", [wq, sw], [f"{w}_dq"], name=f"{w}/dq")
        mm[0].input[list(mm[0].input).index(t_node.output[0])] = f"{w}_dq"
        dropped.add(id(t_node))
        # activation: Q/DQ on the MatMul's other input
        x = mm[0].input[0]
        q = helper.make_node("QuantizeLinear", [x, sx, zp], [f"{x}_q_{name}"], name=f"{name}/q")
        dq_x = helper.make_node("DequantizeLinear", [f"{x}_q_{name}", sx], [f"{x}_dq_{name}"], name=f"{name}/dq")
        mm[0].input[0] = f"{x}_dq_{name}"
        new_nodes_before.setdefault(id(mm[0]), []).extend([dq_w, q, dq_x])
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes_before.get(id(node), []))
        if id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)  # still topologically sorted: each new node sits right before its consumer
    if attention:
        if not table:  # no quantised linear: the blocks' dtype from any block weight
            elem = next(i.type.tensor_type.elem_type for n, i in inputs.items() if n.startswith("net.blocks."))
        blocks = {int(n.split(".")[2]) for n in inputs if n.startswith("net.blocks.")}
        insert_attention_qdq(graph, calibration, elem, len(blocks))
    if not any(o.domain in ("", "ai.onnx") and o.version >= 19 for o in proto.opset_import):
        raise ValueError("FP8 Q/DQ needs opset >= 19")
    onnx.checker.check_model(proto)
    renamed = {old: new for new, (old, _) in fp8_names.items()}
    weights = [renamed.get(n, n) for n in weights]

    def fetch_fp8(name: str) -> torch.Tensor:
        if name in fp8_names:
            old, s_w = fp8_names[name]
            w = fetch(old).float().t().contiguous()  # [in, out]: what MatMul reads, no Transpose in the graph
            return (w / s_w).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return fetch(name)

    return proto, weights, fetch_fp8


SOFTMAX_SCALE = 1.0 / FP8_MAX  # probabilities in [0, 1] -> the full E4M3 range (ModelOpt's fixed scale)


def insert_attention_qdq(graph, calibration: dict, elem: int, num_blocks: int) -> None:
    """ModelOpt-style FP8 attention on the Cast-free form: Q/DQ on the pre-scaled Q and on K before its
    transpose (BMM1 inputs), on the softmax output at 1/448 and on V (BMM2 inputs). The j-th Softmax of the
    graph is the j-th attention call of a DiT forward, whose maxima calibration['attention_amax'][j] holds.
    Attentions of the recipe's bf16 blocks (calibration['bf16_blocks']) stay bf16."""
    from onnx import TensorProto, helper

    amax = calibration.get("attention_amax")
    if not amax:
        raise ValueError("FP8 attention needs attention maxima: calibrate with attention=True (--fp8_attention)")
    dtype = {TensorProto.BFLOAT16: torch.bfloat16, TensorProto.FLOAT: torch.float32}[elem]
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    if len(softmaxes) != len(amax):
        raise ValueError(f"the graph has {len(softmaxes)} attention Softmaxes, the calibration {len(amax)} "
                         "attention calls (calibrated for another model or graph form?)")
    before: dict[int, list] = {}
    zp = "attn_fp8_zero_point"
    graph.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))

    def qdq(tensor: str, scale: float, tag: str, consumer, index: int) -> None:
        s = f"{tag}_scale"
        graph.initializer.append(_scalar(s, max(scale, 1e-12), elem, dtype))
        q = helper.make_node("QuantizeLinear", [tensor, s, zp], [f"{tag}_q"], name=f"{tag}/q")
        dq = helper.make_node("DequantizeLinear", [f"{tag}_q", s], [f"{tag}_dq"], name=f"{tag}/dq")
        consumer.input[index] = f"{tag}_dq"
        before.setdefault(id(consumer), []).extend([q, dq])

    per_block = len(softmaxes) // max(num_blocks, 1)
    keep = set(calibration.get("bf16_blocks", []))
    for j, (sm, (a_q, a_k, a_v)) in enumerate(zip(softmaxes, amax)):
        if per_block and j // per_block in keep:
            continue
        mm1 = producer[sm.input[0]]
        (mm2,) = consumers[sm.output[0]]
        k_t = producer[mm1.input[1]]
        if mm1.op_type != "MatMul" or mm2.op_type != "MatMul" or k_t.op_type != "Transpose":
            raise ValueError(f"attention {j}: expected MatMul(q, Transpose(k)) -> Softmax -> MatMul (the Cast-free "
                             f"form), found {mm1.op_type}, {k_t.op_type} -> Softmax -> {mm2.op_type}")
        tag = f"attn{j}"
        qdq(mm1.input[0], a_q / FP8_MAX, f"{tag}_q", mm1, 0)
        qdq(k_t.input[0], a_k / FP8_MAX, f"{tag}_k", k_t, 0)  # K before its transpose
        qdq(sm.output[0], SOFTMAX_SCALE, f"{tag}_p", mm2, 0)
        qdq(mm2.input[1], a_v / FP8_MAX, f"{tag}_v", mm2, 1)
    nodes = []
    for n in graph.node:
        nodes.extend(before.get(id(n), []))
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def _scalar(name: str, value: float, elem: int, dtype: torch.dtype):
    import onnx

    from .onnx import tensor_bytes

    t = onnx.TensorProto(name=name, data_type=elem, dims=[])
    t.raw_data = tensor_bytes(torch.tensor(value, dtype=dtype))
    return t
