"""ONNX Runtime backends over an engine dir: the exported graphs behind the Backend seam.

CPU provider everywhere; the CUDA provider when onnxruntime-gpu is installed and the pipeline runs on
CUDA. Every graph's I/O is the static spec from the manifest; tensors cross as numpy (fp32/int64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanrt.engine.graph import ContractGraph
from wanrt.engine.manifest import EngineError, Manifest
from wanrt.export import graph_file, graph_key
from wanrt.export.specs import GRAPH_NAMES, GraphSpec, Target


def providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineError("the onnxruntime backend on CUDA needs onnxruntime-gpu (pip install 'wanrt[gpu]'); "
                              f"this onnxruntime has {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Graph(ContractGraph):
    """One verified ONNX graph under the graph contract: inputs checked and cast to the spec, outputs fresh."""

    capturable = False  # host round trips through numpy: never inside a CUDA graph
    reuses_outputs = False  # session.run returns new arrays; they are copied to the device per call

    def __init__(self, manifest: Manifest, name: str, target: Target, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        key = graph_key(name, target)
        entry = manifest.verify_files("graphs", key)  # integrity of every file before loading anything
        super().__init__(GraphSpec.from_dict(entry["spec"]), torch.device("cpu"))  # numpy feeds live on the host
        self.out_device = torch.device(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        path = manifest.root / graph_file(name, target)
        model = str(path)
        if entry.get("attention") in ("flash", "sage"):  # our plugins' custom nodes: run their ONNX reference
            model = _with_reference(path)
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers(device))

    def _run(self, args):
        feed = {s.name: t.detach().numpy() for s, t in zip(self.spec.inputs, args)}
        outs = self.session.run([o.name for o in self.spec.outputs], feed)
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self.out_device) for o in outs]


def _with_reference(path: Path) -> bytes:
    """The graph with its wanrt attention nodes' reference functions attached, as bytes (weights inline)."""
    import onnx

    from wanrt.export.onnx import with_reference_functions

    proto = with_reference_functions(onnx.load(str(path)))
    if proto.ByteSize() > 2_000_000_000:
        raise EngineError(f"{path.name} has custom attention nodes and is too large for ONNX Runtime's in-memory "
                          "reference (2 GB); export with --graph_attention matmul for ONNX Runtime")
    return proto.SerializeToString()


def load_graphs(root: str | Path, target: Target, device: torch.device, names=GRAPH_NAMES, threads: int = 0):
    """{graph name: Graph} for `target` from the engine dir (each verified by sha256 first)."""
    m = Manifest.load(root)
    return {n: Graph(m, n, target, device, threads) for n in names}
