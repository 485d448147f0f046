"""FP8 (E4M3) export of the DiT: calibration, the Q/DQ graph, and the measured FP8 error (tiny, CPU)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from wanrt.engine.exporter import export
from wanrt.export import _fetcher, fp8, graph_file
from wanrt.export import onnx as onnx_export
from wanrt.export.graphs import build_graph, example_inputs
from wanrt.export.specs import Target, graph_specs
from wanrt.models.loading import Checkpoint
from wanrt.pipeline import FLF2VPipeline

TARGET = Target(64, 48, 9)


@pytest.fixture(scope="module")
def pipe(tiny_official):
    return FLF2VPipeline.from_pretrained(tiny_official, fuse=False)  # calibration needs the official linears


def _inputs(spec):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(t.shape, generator=g) if t.dtype == "float32" else torch.tensor([999, 500])
            for t in spec.inputs]


def test_calibration_covers_the_block_linears(pipe, calibration):
    dit = pipe.backends.dit.model
    names = fp8.quantized_linears(dit)
    assert len(names) == 12 * dit.cfg.num_layers  # q k v o + q k v o k_img v_img + ffn up/down
    assert set(calibration["activation_amax"]) == set(names) == set(calibration["weight_amax"])
    assert all(v > 0 for v in calibration["activation_amax"].values())
    assert not any(n.startswith(("patch_embedding", "text_embedding", "time_", "img_emb", "head"))
                   for n in names)  # embedders and head stay high precision


def test_qdq_graph_equals_fake_quant(pipe, calibration, tiny_official, tmp_path):
    """The Q/DQ graph (on an fp32 base, so ONNX Runtime's CPU provider can run it) equals the PyTorch
    fake-quant model with the same scales. ORT's graph optimizer mis-fuses FP8 Q/DQ on the CPU
    (measured 0.89 relative error with it on), so this session runs unoptimised."""
    import onnxruntime as ort

    ckpt = Checkpoint(tiny_official)
    spec = graph_specs(ckpt.config, TARGET)["dit"]
    module = build_graph("dit", ckpt.config, TARGET, "fp32")
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec))
    proto, weights, fetch = fp8.insert_qdq(proto, weights, _fetcher(ckpt, "dit", module), calibration)
    path = tmp_path / "dit_fp8.onnx"
    onnx_export.write(proto, weights, fetch, path)
    onnx_export.check_graph(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    args = _inputs(spec)
    out = session.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})[0]
    dit = pipe.backends.dit.model
    with torch.no_grad():
        ref = dit(*args)
        fq = fp8.fake_quant_model(copy.deepcopy(dit), calibration)(*args)
    err_graph = np.abs(out - fq.numpy()).max() / np.abs(fq.numpy()).max()
    err_fp8 = ((fq - ref).norm() / ref.norm()).item()
    print(f"\nFP8 Q/DQ graph (ORT) vs fake-quant: {err_graph:.1e}; FP8 vs fp32 DiT forward: rel L2 {err_fp8:.2e}")
    # measured 4.2e-7, tolerance 4e-6 (10x): the graph and the fake-quant model round the same E4M3 values
    assert err_graph < 4e-6, err_graph
    # measured 3.0e-2 (README: 2.9e-2), tolerance 0.1 (3.3x) above and 1e-2 (3x) below: 3 mantissa bits give
    # ~6% per value; a fake-quant that stopped quantising gives ~1e-7 and fails the lower bound
    assert 1e-2 < err_fp8 < 0.1, err_fp8


def test_fp8_video_error(pipe, calibration):
    """Whole tiny video with the fake-quant DiT (the same scales the graph uses) vs fp32."""
    from wanrt.metrics import psnr
    from wanrt.samples import sample_frames

    a, b = sample_frames()
    kw = dict(max_area=64 * 48, frame_num=9, sample_steps=4, seed=0, progress=False)
    ref = pipe(a, b, "a bird", **kw).frames
    dit = pipe.backends.dit.model
    original = pipe.backends.dit.model
    pipe.backends.dit.model = fp8.fake_quant_model(copy.deepcopy(dit), calibration)
    try:
        out = pipe(a, b, "a bird", **kw).frames
    finally:
        pipe.backends.dit.model = original
    value = psnr(out, ref)
    print(f"\nFP8 (fake-quant) vs fp32 tiny video: PSNR {value:.1f} dB")
    # measured 32.2 dB (README: 32.4), bounded on both sides: 25 dB is 2.3x the measured RMS error; above 40 dB
    # (2.5x less error) or infinite would mean the FP8 DiT no longer quantises
    assert 25 < value < 40, value


def test_fp8_export_is_bf16_with_qdq(tiny_official, calibration, tmp_path):
    export(tiny_official, tmp_path, TARGET, precision="fp8", components=["dit"], calibration=calibration,
           log=lambda s: None)
    model = onnx.load(str(tmp_path / graph_file("dit", TARGET)))
    ops = [n.op_type for n in model.graph.node]
    n = len(calibration["activation_amax"])
    assert ops.count("QuantizeLinear") == n and ops.count("DequantizeLinear") == 2 * n
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["net.blocks.0.self_attn.q.weight_fp8"] == onnx.TensorProto.FLOAT8E4M3FN
    assert types["net.blocks.0.self_attn.q.weight_scale"] == onnx.TensorProto.BFLOAT16
    assert types["net.patch_embedding.weight"] == onnx.TensorProto.BFLOAT16  # not quantised
    assert types["net.head.head.weight"] == onnx.TensorProto.FLOAT  # fp32 island
