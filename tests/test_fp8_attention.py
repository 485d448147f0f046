"""FP8 attention Q/DQ (ModelOpt style, behind --fp8_attention): calibration of every attention's q/k/v
maxima, the graph pattern (Q/DQ on pre-scaled Q, K before its transpose, V, softmax output at 1/448), and
ONNX Runtime parity with a PyTorch fake-quant of exactly those points (tiny, CPU, fp32 base graph)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wanrt.export import _fetcher, fp8
from wanrt.export import onnx as onnx_export
from wanrt.export.graphs import build_graph, example_inputs
from wanrt.export.specs import Target, graph_specs
from wanrt.models.loading import Checkpoint

TARGET = Target(64, 48, 9)


@pytest.fixture(scope="module")
def pipe(tiny_official):
    from wanrt.pipeline import FLF2VPipeline

    return FLF2VPipeline.from_pretrained(tiny_official, fuse=False)  # fake quant by official names


class FakeQuantAttention:
    """The Q/DQ points of insert_attention_qdq, in PyTorch (per attention call of one DiT forward)."""

    def __init__(self, amax):
        self.amax, self.index = amax, None

    def __call__(self, q, k, v):
        a_q, a_k, a_v = self.amax[self.index]
        self.index += 1
        q = fp8.fake_quant(q * q.shape[-1] ** -0.5, a_q / fp8.FP8_MAX).transpose(1, 2)
        k, v = fp8.fake_quant(k, a_k / fp8.FP8_MAX), fp8.fake_quant(v, a_v / fp8.FP8_MAX)
        p = fp8.fake_quant(torch.softmax(q @ k.permute(0, 2, 3, 1), dim=-1), fp8.SOFTMAX_SCALE)
        return (p @ v.transpose(1, 2)).transpose(1, 2)


def test_calibration_records_every_attention(pipe, calibration):
    n = 3 * pipe.backends.dit.model.cfg.num_layers  # self, image cross, text cross per block
    assert len(calibration["attention_amax"]) == n
    assert all(len(a) == 3 and min(a) > 0 for a in calibration["attention_amax"])
    assert pipe.attention == "sdpa"  # restored


def test_attention_qdq_graph_equals_fake_quant(pipe, calibration, tiny_official, tmp_path):
    """Measured: graph vs fake-quant max relative error 4.7e-7 (fp32 reordering; rounding-boundary flips of
    single values are possible); tolerance 1e-4. FP8 attention + linears vs fp32 DiT: rel L2 3.35e-2
    (linears alone: 3.02e-2, tests/test_fp8.py); bound 0.15."""
    import onnxruntime as ort

    from wanrt.kernels import attention as seam

    ckpt = Checkpoint(tiny_official)
    spec = graph_specs(ckpt.config, TARGET)["dit"]
    module = build_graph("dit", ckpt.config, TARGET, "fp32")
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec))
    proto, weights, fetch = fp8.insert_qdq(proto, weights, _fetcher(ckpt, "dit", module), calibration,
                                           attention=True)
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    for sm in softmaxes:
        mm1 = producer[sm.input[0]]
        (q_node,) = consumers[sm.output[0]]
        (mm2,) = consumers[consumers[q_node.output[0]][0].output[0]]
        assert q_node.op_type == "QuantizeLinear" and mm2.op_type == "MatMul"
        assert producer[mm1.input[0]].op_type == "DequantizeLinear"  # pre-scaled Q
        assert producer[producer[mm1.input[1]].input[0]].op_type == "DequantizeLinear"  # K before its Transpose
        assert producer[mm2.input[1]].op_type == "DequantizeLinear"  # V
    path = tmp_path / "dit.onnx"
    onnx_export.write(proto, weights, fetch, path)
    onnx_export.check_graph(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # see test_fp8.py
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(t.shape, generator=g) if t.dtype == "float32" else torch.tensor([999, 500])
            for t in spec.inputs]
    out = session.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})[0]
    dit = pipe.backends.dit.model
    fq_model = fp8.fake_quant_model(copy.deepcopy(dit), calibration)
    fq_attn = FakeQuantAttention(calibration["attention_amax"])
    seam.register("_test_fp8_attention")(fq_attn)
    hook = fq_model.register_forward_pre_hook(lambda m, a: setattr(fq_attn, "index", 0))
    try:
        with torch.no_grad(), seam.use("_test_fp8_attention"):
            fq = fq_model(*args)
        with torch.no_grad():
            ref = dit(*args)
    finally:
        hook.remove()
    err_graph = np.abs(out - fq.numpy()).max() / np.abs(fq.numpy()).max()
    err_fp8 = ((fq - ref).norm() / ref.norm()).item()
    print(f"\nFP8 attention Q/DQ graph (ORT) vs fake-quant: {err_graph:.1e}; FP8 (linears + attention) vs fp32 "
          f"DiT forward: rel L2 {err_fp8:.2e}")
    assert err_graph < 1e-4
    assert 1e-4 < err_fp8 < 0.15


def test_attention_qdq_needs_its_calibration(tiny_official):
    ckpt = Checkpoint(tiny_official)
    spec = graph_specs(ckpt.config, TARGET)["dit"]
    module = build_graph("dit", ckpt.config, TARGET, "fp32")
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec))
    with pytest.raises(ValueError, match="calibrate with attention=True"):
        fp8.insert_qdq(proto, weights, lambda n: None, {"activation_amax": {}, "weight_amax": {}}, attention=True)
    with pytest.raises(ValueError, match="6 attention Softmaxes, the calibration 1 attention calls"):
        fp8.insert_qdq(proto, weights, lambda n: None,
                       {"activation_amax": {}, "weight_amax": {}, "attention_amax": [[1.0, 1.0, 1.0]]},
                       attention=True)
