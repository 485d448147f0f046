"""What a built TensorRT engine really is, and whether it computes what the ONNX graph does.

- `inspect_plan`: the engine inspector's layer list (built with detailed profiling verbosity), summarised
  as counts of layers, fused attention kernels and FP8 layers; `wanrt build` records it in the manifest,
  so "did TensorRT fuse the attention?" is answered by the engine dir, not by hope.
- `compare_with_onnxruntime`: polygraphy's Comparator runs the plan (TrtRunner) and the exported ONNX
  (OnnxrtRunner, CUDA provider when present) on the same inputs and compares every output; on a mismatch
  the message names the first failing output and the polygraphy command that marks every layer's output
  to find the first mismatching layer.
Both need TensorRT (and polygraphy) on a CUDA machine; elsewhere they fail with one line.
"""

from __future__ import annotations

import json
import re

# kernel / layer names of TensorRT's fused attention (Myelin "mha"/"fmha", IAttention, flash kernels)
FUSED_ATTENTION = re.compile(r"fmha|_mha|mha_|fused_attention|flash_attn|attention", re.IGNORECASE)
FP8 = re.compile(r"fp8|e4m3", re.IGNORECASE)


def summarize_layers(info: str) -> dict:
    """Counts from the engine inspector's JSON (`{"Layers": [...]}`; a layer is a name, or a dict with
    Name / LayerType / TacticName / Inputs / Outputs formats at detailed verbosity)."""
    layers = json.loads(info).get("Layers", [])
    texts = [layer if isinstance(layer, str) else json.dumps(layer) for layer in layers]

    def names(pattern):
        return [_name(layer) for layer, text in zip(layers, texts) if pattern.search(text)]

    attention, fp8 = names(FUSED_ATTENTION), names(FP8)
    return {"layers": len(layers), "fused_attention": len(attention), "fp8": len(fp8),
            "fused_attention_layers": attention[:8], "fp8_layers": fp8[:8]}


def _name(layer) -> str:
    return layer if isinstance(layer, str) else str(layer.get("Name", "?"))


def inspect_plan(trt, plan) -> dict:
    """summarize_layers of a serialized plan (deserialized once, on this GPU)."""
    from .tensorrt import logger

    engine = trt.Runtime(logger(trt)).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the plan it just built")
    inspector = engine.create_engine_inspector()
    return summarize_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def require_polygraphy():
    try:
        import polygraphy  # noqa: F401
    except ImportError as e:
        raise ImportError(f"polygraphy is not installed ({e}); pip install 'wanrt[export]'") from None


def compare_with_onnxruntime(engine_dir, graph: str, target, atol: float = 1e-2, rtol: float = 1e-2,
                             seed: int = 0) -> dict:
    """Run the TensorRT plan and the ONNX graph of `graph` on the same random inputs (polygraphy's
    Comparator); returns {output: {"max_abs": ..., "max_rel": ..., "ok": bool}}; RuntimeError on a mismatch."""
    from .tensorrt import require

    trt = require()
    require_polygraphy()
    import numpy as np
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from wanrt.export import graph_file, graph_key
    from wanrt.export.specs import GraphSpec

    from . import engine_file, engine_key
    from .manifest import Manifest

    m = Manifest.load(engine_dir)
    m.check_integrity()
    entry = m.verify_files("engines", engine_key("tensorrt", graph, target))
    m.verify_files("graphs", graph_key(graph, target))
    spec = GraphSpec.from_dict(entry["spec"])
    rng = np.random.default_rng(seed)
    feed = {}
    for t in spec.inputs:
        if t.dtype == "int64":  # ids / masks / timesteps: small valid values
            feed[t.name] = rng.integers(0, 2 if t.name == "mask" else 100, size=t.shape, dtype=np.int64)
        else:
            feed[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    plan = (m.root / engine_file("tensorrt", graph, target)).read_bytes()
    onnx_path = str(m.root / graph_file(graph, target))
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    runners = [TrtRunner(EngineFromBytes(plan)), OnnxrtRunner(SessionFromOnnx(onnx_path, providers=providers))]
    results = Comparator.run(runners, data_loader=[feed])
    trt_out, ort_out = (results[r.name][0] for r in runners)
    report = {}
    for t in spec.outputs:
        a, b = np.asarray(trt_out[t.name], dtype=np.float64), np.asarray(ort_out[t.name], dtype=np.float64)
        max_abs = float(np.abs(a - b).max())
        max_rel = float(max_abs / max(np.abs(b).max(), 1e-12))
        report[t.name] = {"max_abs": max_abs, "max_rel": max_rel, "ok": bool(np.allclose(a, b, rtol, atol))}
    ok = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
    bad = [n for n, r in report.items() if not r["ok"]]
    if bad or not ok:
        first = bad[0] if bad else spec.outputs[0].name
        raise RuntimeError(f"{graph}: TensorRT {trt.__version__} and ONNX Runtime differ at output {first} "
                           f"({report.get(first)}); find the first mismatching layer with `polygraphy run "
                           f"{onnx_path} --trt --onnxrt --strongly-typed --trt-outputs mark all --onnx-outputs "
                           f"mark all --atol {atol} --rtol {rtol}`")
    return report
