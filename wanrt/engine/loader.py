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


def load(backend: str, m: Manifest, target: Target, device: torch.device, names=GRAPHS, lora=None,
         checkpoint: str | None = None) -> dict:
    """{graph name: loaded graph} of the engine dir for `target`, after the compatibility checks.

    AOTInductor packages built without their weights get them here: the checkpoint they were built from
    (`checkpoint`, or the manifest's path; its fingerprint must match) is loaded at the engine dir's
    precision, with `lora` ([(file, scale), ...]) merged into the DiT, once for all such packages."""
    from .dir import EngineDir

    check_compatible(m, backend, target, device, names)
    layout = EngineDir(m.root, m)  # the one owner of the engine dir's paths
    entries = {g: m.verify_files("engines", engine_key(backend, g, target)) for g in names}
    models = None
    if backend == "aoti":
        external = [g for g in names if entries[g].get("weights") == "checkpoint"]
        if external:
            models = _checkpoint_models(m, device, external, lora, checkpoint)
    graphs = {}
    for graph in names:
        entry = entries[graph]
        spec = GraphSpec.from_dict(entry["spec"])
        if backend == "aoti":
            from wanrt.export.graphs import graph_module

            from .aoti import AOTIGraph

            weights = graph_module(graph, models, target) if entry.get("weights") == "checkpoint" else None
            graphs[graph] = AOTIGraph(layout.engine_path("aoti", graph, target, device.type), spec, device,
                                      weights=weights)
        else:
            from .tensorrt import TRTGraph

            graphs[graph] = TRTGraph(layout.engine_path("tensorrt", graph, target), spec, device,
                                     onnx_path=m.root / entry["onnx"],
                                     stripped=entry["settings"]["strip_weights"])
    return graphs


def _checkpoint_models(m: Manifest, device: torch.device, graphs, lora, checkpoint):
    """The loaded models whose tensors are the constants of weight-less AOTInductor packages."""
    from wanrt.export.specs import TABLE
    from wanrt.models.loading import Checkpoint, CheckpointError

    from . import load_for_aoti

    path = checkpoint or m.checkpoint["path"]
    rebuild = f"rebuild with `wanrt build --backend aoti --force --out {m.root} ...`"
    try:
        fingerprint = Checkpoint(path).fingerprint()
    except CheckpointError as e:
        raise EngineError(f"{m.root}: its aoti packages read their weights from the checkpoint they were built "
                          f"from, and {e}; pass --ckpt_dir with that checkpoint") from None
    if fingerprint != m.checkpoint["fingerprint"]:
        raise EngineError(f"{m.root}: the checkpoint at {path} changed since the aoti packages were built (they "
                          f"read its weights at load); {rebuild}")
    parts = sorted({c.weights for c in TABLE.values() if set(c.graphs) & set(graphs)})
    return load_for_aoti(path, m.precision, parts, device, lora=lora)
