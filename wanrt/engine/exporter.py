"""`wanrt export`: the components to static, TensorRT-ready ONNX for one target (size, frames, batch),
written into an engine dir.

Writes ENGINE_DIR/onnx/<graph>.onnx (T5 and CLIP, resolution-independent) and
ENGINE_DIR/onnx/<W>x<H>x<F>/<graph>.onnx (DiT and the VAE chunk graphs), weights streamed from the
checkpoint, plus ENGINE_DIR/manifest.json and a copy of the tokenizer, so an engine dir is
self-contained. Finished files are skipped on re-runs. (The engine layer writes the engine dir; the
export layer below it only traces and writes single graphs.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from wanrt.export import _copy_tokenizer, _fetcher, graph_file, graph_key, lora_plan
from wanrt.export.specs import (
    COMPONENTS,
    GRAPHS,
    PRECISIONS,
    Target,
    check_components,
    graph_specs,
    resolution_dependent,
)


def export(ckpt_dir: str | Path, out: str | Path, target: Target, precision: str = "fp32",
           components: Iterable[str] = COMPONENTS, force: bool = False,
           log: Callable[[str], None] = print, inline_limit: int | None = None,
           calibration: dict | None = None, graph_attention: str = "matmul", fp8_attention: bool = False,
           lora=None):
    """Export `components` of the checkpoint for `target` into the engine dir `out`; returns its Manifest.

    lora: [(file, scale), ...] merged into the DiT's weights (fp32, before the graph's cast); the DiT graph
    entry records them, so exporting again with other LoRAs rewrites only the DiT graph."""
    from wanrt.export import onnx as onnx_export
    from wanrt.export.graphs import build_graph, example_inputs
    from wanrt.models.loading import Checkpoint

    from .dir import EngineDir

    components = check_components(components)
    if fp8_attention and graph_attention != "matmul":
        raise ValueError("--fp8_attention quantises the Cast-free matmul attention; use --graph_attention matmul")
    if graph_attention not in onnx_export.GRAPH_ATTENTION:
        raise ValueError(f"graph attention must be one of {', '.join(onnx_export.GRAPH_ATTENTION)}, "
                         f"got {graph_attention!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    ckpt = Checkpoint(ckpt_dir)
    cfg = ckpt.config
    specs = graph_specs(cfg, target)
    plan, lora_ids = lora_plan(cfg, lora)  # every LoRA checked before anything is written
    if force and (out / "manifest.json").exists():
        (out / "manifest.json").unlink()
    engine_dir = EngineDir(out)
    manifest = engine_dir.open(source={"path": str(ckpt.folder), "layout": ckpt.layout,
                                       "fingerprint": ckpt.fingerprint()},
                               config=dataclasses.asdict(cfg), precision=precision, target=target)
    _copy_tokenizer(ckpt, out)

    for component in components:
        for graph in GRAPHS[component]:
            key, rel = graph_key(graph, target), graph_file(graph, target)
            spec = specs[graph]
            form = graph_attention if graph == "dit" else "matmul"  # the DiT is where attention costs
            qdq_attention = fp8_attention and precision == "fp8" and graph == "dit"
            extra = {"lora": lora_ids} if graph == "dit" else {}
            if not force and manifest.is_current("graphs", key, spec=spec.to_dict(), attention=form,
                                                 fp8_attention=qdq_attention, **extra):
                log(f"{key}: up to date")
                continue
            t0 = time.perf_counter()
            log(f"{key}: tracing")
            module = build_graph(graph, cfg, target, precision)
            proto, weights = onnx_export.trace(module, spec, example_inputs(spec), graph_attention=form)
            fetch = _fetcher(ckpt, component, module, plan if graph == "dit" else None)
            if precision == "fp8" and graph == "dit":
                from wanrt.export.fp8 import insert_qdq

                proto, weights, fetch = insert_qdq(proto, weights, fetch,
                                                   calibration or _calibration(engine_dir.calibration_path),
                                                   attention=qdq_attention)
            log(f"{key}: writing weights")
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            kw = {} if inline_limit is None else {"inline_limit": inline_limit}
            info = onnx_export.write(proto, weights, fetch, path, **kw)
            checked = onnx_export.check_graph(path)
            files = [str(Path(rel).parent / f) for f in info["files"]]
            profile = target.tag if resolution_dependent(graph) else None
            manifest.record("graphs", key, files, component=component, graph=graph, profile=profile, attention=form,
                            fp8_attention=qdq_attention,
                            spec=spec.to_dict(), weight_bytes=info["bytes"], ops=checked["ops"],
                            export_seconds=round(time.perf_counter() - t0, 2), **extra)
            log(f"{key}: {rel} ({info['bytes'] / 1e6:.1f} MB weights, {checked['nodes']} nodes, "
                f"{time.perf_counter() - t0:.1f} s)")
    if "dit" in components:
        write_time_table(manifest, lambda: time_module(ckpt), force, log)
    return manifest


TIME_TABLE = "dit_time.safetensors"


def time_module(ckpt) -> torch.nn.Module:
    """The checkpoint's DiT with only its time-embedding layers loaded (fp32, CPU; the rest stays on meta)."""
    from wanrt.models.dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(ckpt.config.dit)
    weights = ckpt.weights("dit")
    for part in (dit.time_embedding, dit.time_projection):
        part.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if name.startswith(("time_embedding.", "time_projection.")):
                value = weights[name] if isinstance(weights, dict) else weights.read(name)
                param.copy_(value.float())
    dit.time_table = dit.derived_buffers("cpu")["time_table"]
    return dit


def write_time_table(manifest, dit: Callable[[], torch.nn.Module], force: bool = False,
                     log: Callable[[str], None] = print) -> None:
    """Write the DiT's time embeddings e (1001, dim) and e0 (1001, 6, dim) of every integer timestep,
    fp32, as the engine dir's `dit_time` table (manifest section "tables"). Step caching measures them
    (wanrt/runtime/cache.py); an engine's DiT graph takes t as an input but does not return them."""
    import os

    from safetensors.torch import save_file

    if not force and manifest.is_current("tables", "dit_time"):
        log("dit_time: up to date")
        return
    model = dit()
    with torch.no_grad():
        t = torch.arange(model.cfg.num_train_timesteps + 1, device=model.time_table.device)
        e, e0 = model.embed_time(t)
    path = manifest.root / TIME_TABLE
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"e": e.float().cpu().contiguous(), "e0": e0.float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, path)
    manifest.record("tables", "dit_time", [TIME_TABLE], timesteps=len(t), dtype="float32")
    log(f"dit_time: {TIME_TABLE} ({path.stat().st_size / 1e6:.1f} MB)")


def _calibration(path: Path) -> dict:
    import json

    if not path.is_file():
        raise ValueError(f"fp8 export needs activation scales: {path} is missing (run `wanrt export --precision "
                         "fp8`, which calibrates first)")
    return json.loads(path.read_text())


