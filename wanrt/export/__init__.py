"""`wanrt export`: the four models to static, TensorRT-ready ONNX for one target (size, frames, batch).

Writes ENGINE_DIR/onnx/<graph>.onnx (T5 and CLIP, resolution-independent) and
ENGINE_DIR/onnx/<W>x<H>x<F>/<graph>.onnx (DiT and the VAE chunk graphs), weights streamed from the
checkpoint, plus ENGINE_DIR/manifest.json and a copy of the tokenizer, so an engine dir is
self-contained. Finished files are skipped on re-runs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .specs import COMPONENTS, GRAPHS, PRECISIONS, Target, graph_specs, resolution_dependent

_WEIGHTS = {"t5": "text_encoder", "clip": "image_encoder", "dit": "dit", "vae": "vae"}


def graph_key(graph: str, target: Target) -> str:
    return f"{graph}@{target.tag}" if resolution_dependent(graph) else graph


def graph_file(graph: str, target: Target) -> str:
    return f"onnx/{target.tag}/{graph}.onnx" if resolution_dependent(graph) else f"onnx/{graph}.onnx"


def export(ckpt_dir: str | Path, out: str | Path, target: Target, precision: str = "fp32",
           components: Iterable[str] = COMPONENTS, force: bool = False,
           log: Callable[[str], None] = print, inline_limit: int | None = None,
           calibration: dict | None = None):
    """Export `components` of the checkpoint for `target` into the engine dir `out`; returns its Manifest."""
    from wanrt.engine.manifest import Manifest
    from wanrt.models.loading import Checkpoint

    from . import onnx as onnx_export
    from .graphs import build_graph, example_inputs

    components = list(dict.fromkeys(components))
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ValueError(f"unknown component(s) {bad}; choose from {', '.join(COMPONENTS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    ckpt = Checkpoint(ckpt_dir)
    cfg = ckpt.config
    specs = graph_specs(cfg, target)
    if force and (out / "manifest.json").exists():
        (out / "manifest.json").unlink()
    manifest = Manifest.open(out)
    manifest.init(checkpoint={"path": str(ckpt.folder), "layout": ckpt.layout, "fingerprint": ckpt.fingerprint()},
                  config=dataclasses.asdict(cfg), precision=precision, batch=target.batch)
    manifest.add_profile(target.tag, target.width, target.height, target.frame_num)
    _copy_tokenizer(ckpt, out)
    manifest.save()

    for component in components:
        for graph in GRAPHS[component]:
            key, rel = graph_key(graph, target), graph_file(graph, target)
            spec = specs[graph]
            if not force and manifest.is_current("graphs", key, spec=spec.to_dict()):
                log(f"{key}: up to date")
                continue
            t0 = time.perf_counter()
            log(f"{key}: tracing")
            module = build_graph(graph, cfg, target, precision)
            proto, weights = onnx_export.trace(module, spec, example_inputs(spec))
            fetch = _fetcher(ckpt, component, module)
            if precision == "fp8" and graph == "dit":
                from .fp8 import insert_qdq

                proto, weights, fetch = insert_qdq(proto, weights, fetch, calibration or _calibration(out))
            log(f"{key}: writing weights")
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            kw = {} if inline_limit is None else {"inline_limit": inline_limit}
            info = onnx_export.write(proto, weights, fetch, path, **kw)
            checked = onnx_export.check_graph(path)
            files = [str(Path(rel).parent / f) for f in info["files"]]
            profile = target.tag if resolution_dependent(graph) else None
            manifest.record("graphs", key, files, graph=graph, profile=profile,
                            spec=spec.to_dict(), weight_bytes=info["bytes"], ops=checked["ops"],
                            export_seconds=round(time.perf_counter() - t0, 2))
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
    manifest.data.setdefault("tables", {})
    manifest.record("tables", "dit_time", [TIME_TABLE], timesteps=len(t), dtype="float32")
    log(f"dit_time: {TIME_TABLE} ({path.stat().st_size / 1e6:.1f} MB)")


def _fetcher(ckpt, component: str, module: torch.nn.Module):
    """name -> tensor for the graph's initializers: checkpoint weights under `net.`, else derived values."""
    from wanrt.models.checkpoint import tied_names

    weights = ckpt.weights(_WEIGHTS[component.split("_")[0]])
    derived = module.derived()
    ties = tied_names(module.net)

    def fetch(name: str) -> torch.Tensor:
        if name in derived:
            return derived[name]
        key = name.removeprefix("net.")
        key = next((k for k in ties.get(key, [key]) if k in weights), key)  # tied weights: any stored name
        return weights[key] if isinstance(weights, dict) else weights.read(key)

    return fetch


def _calibration(out: Path) -> dict:
    import json

    path = out / "calibration" / "fp8_scales.json"
    if not path.is_file():
        raise ValueError(f"fp8 export needs activation scales: {path} is missing (run `wanrt export --precision "
                         "fp8`, which calibrates first)")
    return json.loads(path.read_text())


def _copy_tokenizer(ckpt, out: Path) -> None:
    """The engine dir carries its tokenizer, so generating from it needs no checkpoint."""
    dest = out / "tokenizer"
    if (dest / "tokenizer_config.json").is_file():
        return
    tmp = out / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.tokenizer().save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
