"""FP8 (E4M3) for the DiT: "max" calibration on real denoising steps, then explicit Q/DQ in the graph.

Our own small pass (NVIDIA ModelOpt is not installable on these machines): per-tensor scales
amax / 448 for every linear of the attention blocks (self-attention q/k/v/o, cross-attention
q/k/v/o/k_img/v_img, FFN up/down). Patch embedding, time/text/image embedders and the head stay in
high precision, as in NVIDIA's Wan recipe. In the graph each quantised linear becomes

    x (bf16) -> QuantizeLinear(s_x) -> DequantizeLinear(s_x) -> MatMul <- Transpose <- DequantizeLinear(s_w) <- W (fp8)

which is the pattern TensorRT's strongly typed builder turns into FP8 GEMMs. `fake_quant` applies the
same scales to a PyTorch model, which is how the FP8 error is measured where no FP8 runtime exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

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


# ------------------------------------------------------------------------------------------ calibration


@torch.no_grad()
def calibrate(pipe, target, steps: int = 4, prompt: str | None = None, frames=None) -> dict:
    """Run `steps` denoising steps of the eager pipeline at the target size and record, per quantised
    linear, the max |input| ("max" calibration) and max |weight|. Returns the scale table."""
    from wanrt.samples import SAMPLE_PROMPT, sample_frames

    dit = pipe.backends.dit.model
    amax: dict[str, float] = {}
    hooks = []
    for name in quantized_linears(dit):
        def hook(module, args, name=name):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().float().item())

        hooks.append(dit.get_submodule(name).register_forward_pre_hook(hook))
    try:
        first, last = frames or sample_frames()
        pipe(first, last, prompt or SAMPLE_PROMPT, frame_num=target.frame_num,
             max_area=target.width * target.height, sample_steps=steps, seed=0, progress=False)
    finally:
        for h in hooks:
            h.remove()
    weights = {n: dit.get_submodule(n).weight.detach().abs().max().float().item() for n in amax}
    return {"format": "float8_e4m3fn", "method": "max", "steps": steps, "target": [target.width, target.height,
            target.frame_num], "activation_amax": amax, "weight_amax": weights}


def calibrate_to(ckpt_dir, out, target, steps: int = 4, log: Callable[[str], None] = print, lora=None) -> dict:
    """Calibrate with the eager pipeline (on CUDA when present) and store out/calibration/fp8_scales.json.
    With `lora`, the DiT is calibrated with the LoRAs merged (its weight scales depend on them)."""
    from wanrt.engine.manifest import write_json_atomic
    from wanrt.models.lora import identities
    from wanrt.pipeline import FLF2VPipeline

    lora_ids = identities(lora)
    path = Path(out) / "calibration" / "fp8_scales.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("steps") == steps and data.get("target") == [target.width, target.height, target.frame_num] \
                and data.get("lora", []) == lora_ids:
            log(f"fp8: using the calibration in {path}")
            return data
    log(f"fp8: calibrating on {steps} denoising steps at {target.width}x{target.height}x{target.frame_num}")
    pipe = FLF2VPipeline.from_pretrained(ckpt_dir, lora=lora)
    data = calibrate(pipe, target, steps) | {"lora": lora_ids}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return data


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


def insert_qdq(proto, weights: list[str], fetch: Callable[[str], torch.Tensor], calibration: dict):
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
    fp8_names = {}
    for name, (s_x, s_w) in table.items():
        w = f"net.{name}.weight"
        if w not in inputs:
            raise ValueError(f"calibrated linear {name} is not in the graph (calibration for another model?)")
        elem = inputs[w].type.tensor_type.elem_type  # bf16 (or fp32): the matmul's dtype
        np_dtype = {TensorProto.BFLOAT16: torch.bfloat16, TensorProto.FLOAT: torch.float32}[elem]
        # weight: FP8 input -> DequantizeLinear -> (the old consumers, a Transpose)
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
        dq_w = helper.make_node("DequantizeLinear", [wq, sw], [f"{w}_dq"], name=f"{w}/dq")
        t_node.input[list(t_node.input).index(w)] = f"{w}_dq"
        # activation: Q/DQ on the MatMul's other input
        mm = consumers.get(t_node.output[0], [])
        if t_node.op_type != "Transpose" or len(mm) != 1 or mm[0].op_type != "MatMul":
            raise ValueError(f"{w}: expected Transpose -> MatMul, found {t_node.op_type} -> "
                             f"{[n.op_type for n in mm]}")
        x = mm[0].input[0]
        q = helper.make_node("QuantizeLinear", [x, sx, zp], [f"{x}_q_{name}"], name=f"{name}/q")
        dq_x = helper.make_node("DequantizeLinear", [f"{x}_q_{name}", sx], [f"{x}_dq_{name}"], name=f"{name}/dq")
        mm[0].input[0] = f"{x}_dq_{name}"
        new_nodes_before.setdefault(id(t_node), []).append(dq_w)
        new_nodes_before.setdefault(id(mm[0]), []).extend([q, dq_x])
    nodes = []
    for node in graph.node:
        nodes.extend(new_nodes_before.get(id(node), []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)  # still topologically sorted: each new node sits right before its consumer
    if not any(o.domain in ("", "ai.onnx") and o.version >= 19 for o in proto.opset_import):
        raise ValueError("FP8 Q/DQ needs opset >= 19")
    onnx.checker.check_model(proto)
    renamed = {old: new for new, (old, _) in fp8_names.items()}
    weights = [renamed.get(n, n) for n in weights]

    def fetch_fp8(name: str) -> torch.Tensor:
        if name in fp8_names:
            old, s_w = fp8_names[name]
            return (fetch(old).float() / s_w).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return fetch(name)

    return proto, weights, fetch_fp8


def _scalar(name: str, value: float, elem: int, dtype: torch.dtype):
    import onnx

    from .onnx import tensor_bytes

    t = onnx.TensorProto(name=name, data_type=elem, dims=[])
    t.raw_data = tensor_bytes(torch.tensor(value, dtype=dtype))
    return t
