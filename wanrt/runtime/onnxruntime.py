"""ONNX Runtime backends over an engine dir: the exported graphs behind the Backend seam.

CPU provider everywhere; the CUDA provider when onnxruntime-gpu is installed and the pipeline runs on
CUDA. Every graph's I/O is the static spec from the manifest; tensors cross as numpy (fp32/int64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanrt.engine.manifest import EngineError, Manifest
from wanrt.export import graph_file, graph_key
from wanrt.export.specs import GraphSpec, Target
from wanrt.runtime.backends import GRAPH_NAMES


def providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise EngineError("the onnxruntime backend on CUDA needs onnxruntime-gpu (pip install 'wanrt[gpu]'); "
                              f"this onnxruntime has {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Graph:
    """One verified ONNX graph: `graph(*tensors) -> list[torch.Tensor]` in spec order."""

    capturable = False  # host round trips through numpy: never inside a CUDA graph

    def __init__(self, manifest: Manifest, name: str, target: Target, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        key = graph_key(name, target)
        entry = manifest.verify_files("graphs", key)  # sha256 of every file before loading anything
        self.spec = GraphSpec.from_dict(entry["spec"])
        self.device = device
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        path = manifest.root / graph_file(name, target)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers(device))

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        feed = {}
        for spec, t in zip(self.spec.inputs, tensors):
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"{self.spec.name}: input {spec.name} has shape {tuple(t.shape)}, "
                                 f"the engine was built for {spec.shape}")
            feed[spec.name] = t.detach().to("cpu", getattr(torch, spec.dtype)).contiguous().numpy()
        outs = self.session.run([o.name for o in self.spec.outputs], feed)
        return [torch.from_numpy(np.ascontiguousarray(o)).to(self.device) for o in outs]


def load_graphs(root: str | Path, target: Target, device: torch.device, names=GRAPH_NAMES, threads: int = 0):
    """{graph name: Graph} for `target` from the engine dir (each verified by sha256 first)."""
    m = Manifest.load(root)
    return {n: Graph(m, n, target, device, threads) for n in names}
