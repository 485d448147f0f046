"""Loading compiled engines behind the Backend seam, after the manifest says they fit this machine.

Checked before anything is loaded: the wanrt version that built them, the library version (torch for
AOTInductor, TensorRT for plans), the device (and GPU compute capability for TensorRT), the profile,
and every file's sha256. A mismatch is one line that says how to rebuild.
"""

from __future__ import annotations

import torch

from wanrt.engine.manifest import EngineError, Manifest
from wanrt.export.specs import GRAPH_NAMES as GRAPHS
from wanrt.export.specs import GraphSpec, Target

from . import engine_key


def check_compatible(m: Manifest, backend: str, target: Target, device: torch.device, graphs=GRAPHS) -> None:
    import wanrt

    rebuild = f"rebuild with `wanrt build --backend {backend} --force --out {m.root} ...`"
    built_by = m.versions.get("wanrt")
    if built_by != wanrt.__version__:
        raise EngineError(f"{m.root} was built by wanrt {built_by}, this is wanrt {wanrt.__version__}; {rebuild}")
    for graph in graphs:
        e = m.entry("engines", engine_key(backend, graph, target))
        if e is None:
            raise EngineError(f"{m.root} has no {backend} engine for {graph} at {target.tag}; {rebuild}")
        if backend == "aoti":
            if e["torch"] != torch.__version__:
                raise EngineError(f"{m.root}: {graph} was compiled by torch {e['torch']}, this is torch "
                                  f"{torch.__version__}; {rebuild}")
            if e["device"] != device.type:
                raise EngineError(f"{m.root}: {graph} was compiled for {e['device']}, not {device.type}; {rebuild} "
                                  f"--device {device.type}")
        else:
            from .tensorrt import require

            trt = require()
            if e["tensorrt"] != trt.__version__:
                raise EngineError(f"{m.root}: {graph} was built with TensorRT {e['tensorrt']}, this is "
                                  f"{trt.__version__}; {rebuild}")
            props = torch.cuda.get_device_properties(device)
            if e["compute_capability"] != f"{props.major}.{props.minor}":
                raise EngineError(f"{m.root}: {graph} was built for a {e['gpu']} (sm {e['compute_capability']}), "
                                  f"this is a {props.name} (sm {props.major}.{props.minor}); {rebuild}")


def load(backend: str, m: Manifest, target: Target, device: torch.device, names=GRAPHS) -> dict:
    """{graph name: loaded graph} of the engine dir for `target`, after the compatibility checks."""
    from .dir import EngineDir

    check_compatible(m, backend, target, device, names)
    layout = EngineDir(m.root, m)  # the one owner of the engine dir's paths
    graphs = {}
    for graph in names:
        entry = m.verify_files("engines", engine_key(backend, graph, target))
        spec = GraphSpec.from_dict(entry["spec"])
        if backend == "aoti":
            from .aoti import AOTIGraph

            graphs[graph] = AOTIGraph(layout.engine_path("aoti", graph, target, device.type), spec, device)
        else:
            from .tensorrt import TRTGraph

            graphs[graph] = TRTGraph(layout.engine_path("tensorrt", graph, target), spec, device,
                                     onnx_path=m.root / entry["onnx"],
                                     stripped=entry["settings"]["strip_weights"])
    return graphs
