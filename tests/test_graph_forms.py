"""The exported graphs in the forms TensorRT fuses: Cast-free MatMul-Softmax-MatMul attention (default),
the opset-23 `Attention` op (option), FP8 weights stored pre-transposed so DequantizeLinear feeds MatMul.
Graph-pattern checks on the traced ONNX, and ONNX Runtime parity for the new Attention form (tiny, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanrt.export import onnx as onnx_export
from wanrt.export.graphs import build_graph, example_inputs
from wanrt.export.specs import Target, graph_specs
from wanrt.models.config import WanConfig

TARGET = Target(64, 48, 9)


def _trace(precision="bf16", form="matmul"):
    cfg = WanConfig.tiny()
    spec = graph_specs(cfg, TARGET)["dit"]
    module = build_graph("dit", cfg, TARGET, precision)
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec), graph_attention=form)
    return proto, weights, module


def _graph_maps(proto):
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def cast_islands(proto) -> list[str]:
    """Softmax nodes that are not MatMul -> Softmax -> MatMul with nothing in between."""
    producer, consumers = _graph_maps(proto)
    bad = []
    for n in proto.graph.node:
        if n.op_type != "Softmax":
            continue
        before = producer[n.input[0]].op_type
        after = sorted({c.op_type for c in consumers.get(n.output[0], [])})
        if before != "MatMul" or after != ["MatMul"]:
            bad.append(f"{before} -> Softmax -> {after}")
    return bad


def test_bf16_attention_is_cast_free():
    proto, _, module = _trace("bf16")
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    # 2 blocks x (self + text cross + image cross) attention
    assert len(softmaxes) == 3 * module.net.cfg.num_layers
    assert cast_islands(proto) == []


def test_the_pattern_check_sees_a_cast_island(monkeypatch):
    """Switched off (the old math form: softmax in fp32 between two Casts), the check fails."""
    monkeypatch.setattr(onnx_export, "_register_forms", lambda: {"matmul": "math"})
    proto, _, _ = _trace("bf16")
    islands = cast_islands(proto)
    assert islands and all(i == "Cast -> Softmax -> ['Cast']" for i in islands)


def test_attention_op_form_and_ort_parity(tiny_official, tmp_path):
    """opset 23 `Attention` (q pre-scaled, scale 1) in the fp32 DiT; ONNX Runtime runs it and matches the
    eager DiT on the same inputs. Measured max relative error 4.7e-7 (fp32 reordering); tolerance 1e-4
    (a few hundred times above: other CPUs reorder the sums differently)."""
    import onnxruntime as ort

    from wanrt.export import _fetcher
    from wanrt.export.graphs import graph_module
    from wanrt.models.loading import Checkpoint, load

    ckpt = Checkpoint(tiny_official)
    spec = graph_specs(ckpt.config, TARGET)["dit"]
    module = build_graph("dit", ckpt.config, TARGET, "fp32")
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec), graph_attention="onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Attention") == 3 * ckpt.config.dit.num_layers and "Softmax" not in ops
    assert any(o.domain in ("", "ai.onnx") and o.version == 23 for o in proto.opset_import)
    path = tmp_path / "dit.onnx"
    onnx_export.write(proto, weights, _fetcher(ckpt, "dit", module), path)
    assert "Attention" in onnx_export.check_graph(path)["ops"]  # in TensorRT's operator list
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=g) if t.dtype == "float32" else torch.tensor([999, 500])
              for t in spec.inputs]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]
    with torch.no_grad():
        want = graph_module("dit", load(tiny_official, components=("dit",)), TARGET)(*inputs).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"\nopset-23 Attention DiT vs eager: max rel err {rel:.2e}")
    assert rel < 1e-4


def test_fp8_weights_are_pre_transposed():
    """Every FP8 weight: stored [in, out], DequantizeLinear -> MatMul (input 1) with no Transpose between."""
    from wanrt.export.fp8 import insert_qdq, quantized_linears

    proto, weights, module = _trace("bf16")
    names = quantized_linears(module.net)
    calibration = {"activation_amax": dict.fromkeys(names, 1.0), "weight_amax": dict.fromkeys(names, 1.0)}
    shapes = {f"net.{n}.weight": tuple(module.net.get_submodule(n).weight.shape) for n in names}
    proto, weights, _ = insert_qdq(proto, weights, lambda n: None, calibration)
    producer, consumers = _graph_maps(proto)
    inputs = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in proto.graph.input}
    for w, (out_f, in_f) in shapes.items():
        assert inputs[f"{w}_fp8"] == (in_f, out_f)
        (dq,) = consumers[f"{w}_fp8"]
        (mm,) = consumers[dq.output[0]]
        assert dq.op_type == "DequantizeLinear" and mm.op_type == "MatMul" and mm.input[1] == dq.output[0]
        assert producer[mm.input[0]].op_type == "DequantizeLinear"  # the activation's Q/DQ
    assert not [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0].endswith("_dq")]


@pytest.mark.parametrize("form", ["triton", "Attention"])
def test_unknown_graph_attention_is_refused(form):
    with pytest.raises(ValueError, match="graph attention must be one of matmul, onnx, flash, sage"):
        _trace("fp32", form)


@pytest.mark.parametrize("form", ["flash", "sage"])
def test_plugin_forms_emit_custom_nodes_with_an_ort_reference(tiny_official, tmp_path, form):
    """--graph_attention flash|sage: every DiT attention is one wanrt::*Attention node (what `wanrt build`
    maps to our TensorRT plugins); with the reference functions attached ONNX Runtime runs the graph and
    matches the eager DiT. Measured max relative error 4.7e-7 (the exact-attention reference, fp32);
    tolerance 1e-4. Without the reference, ORT cannot load the graph at all."""
    pytest.importorskip("triton")
    import onnx
    import onnxruntime as ort

    from wanrt.export import _fetcher
    from wanrt.export.graphs import graph_module
    from wanrt.models.loading import Checkpoint, load

    ckpt = Checkpoint(tiny_official)
    spec = graph_specs(ckpt.config, TARGET)["dit"]
    module = build_graph("dit", ckpt.config, TARGET, "fp32")
    proto, weights = onnx_export.trace(module, spec, example_inputs(spec), graph_attention=form)
    custom = [n for n in proto.graph.node if n.domain == "wanrt"]
    op = {"flash": "FlashAttention", "sage": "SageAttention"}[form]
    assert [n.op_type for n in custom] == [op] * (3 * ckpt.config.dit.num_layers)
    assert "Softmax" not in {n.op_type for n in proto.graph.node}
    path = tmp_path / "dit.onnx"
    onnx_export.write(proto, weights, _fetcher(ckpt, "dit", module), path)
    onnx_export.check_graph(path)  # schemas registered: the custom nodes validate
    with pytest.raises(Exception, match=op):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = onnx_export.with_reference_functions(onnx.load(str(path)))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=g) if t.dtype == "float32" else torch.tensor([999, 500])
              for t in spec.inputs]
    got = session.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]
    with torch.no_grad():
        want = graph_module("dit", load(tiny_official, components=("dit",)), TARGET)(*inputs).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"\n{form} custom nodes (ORT reference) vs eager: max rel err {rel:.2e}")
    assert rel < 1e-4


def test_flash_engine_dir_runs_in_onnxruntime(tiny_official, tmp_path):
    """End to end: `export --graph_attention flash` records the form in the manifest, and the onnxruntime
    backend runs the DiT graph through the reference functions; the video matches the eager one.
    Measured PSNR vs eager 86.5 dB (fp32 graph, exact reference); threshold 40 dB as for the
    other ONNX Runtime graphs (tests/test_runtime.py)."""
    pytest.importorskip("triton")
    from wanrt.engine.exporter import export
    from wanrt.engine.manifest import Manifest
    from wanrt.metrics import psnr
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.samples import sample_frames

    export(tiny_official, tmp_path, TARGET, precision="fp32", components=["dit"], graph_attention="flash",
           log=lambda s: None)
    assert Manifest.load(tmp_path).entry("graphs", "dit@64x48x9")["attention"] == "flash"
    a, b = sample_frames()
    kw = dict(max_area=64 * 48, frame_num=9, sample_steps=3, seed=0, progress=False)
    ref = FLF2VPipeline.from_pretrained(tiny_official)(a, b, "a bird", **kw).frames
    pipe = FLF2VPipeline.from_pretrained(tiny_official, overrides={"dit": "onnxruntime"}, engine_dir=tmp_path)
    video = pipe(a, b, "a bird", **kw)
    value = psnr(video.frames, ref)
    print(f"\nflash-node DiT in ONNX Runtime vs eager: PSNR {value:.1f} dB")
    assert video.backends["dit"] == "onnxruntime" and value >= 40
