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
           calibration: dict | None = None, lora=None):
    """Export `components` of the checkpoint for `target` into the engine dir `out`; returns its Manifest.

    lora: [(file, scale), ...] merged into the DiT's weights (fp32, before the graph's cast); the DiT graph
    entry records them, so exporting again with other LoRAs rewrites only the DiT graph."""
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
    lora_plan, lora_ids = _lora_plan(cfg, lora)  # every LoRA checked before anything is written
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
            extra = {"lora": lora_ids} if graph == "dit" else {}
            if not force and manifest.is_current("graphs", key, spec=spec.to_dict(), **extra):
                log(f"{key}: up to date")
                continue
            t0 = time.perf_counter()
            log(f"{key}: tracing")
            module = build_graph(graph, cfg, target, precision)
            proto, weights = onnx_export.trace(module, spec, example_inputs(spec))
            fetch = _fetcher(ckpt, component, module, lora_plan if graph == "dit" else None)
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
                            export_seconds=round(time.perf_counter() - t0, 2), **extra)
            log(f"{key}: {rel} ({info['bytes'] / 1e6:.1f} MB weights, {checked['nodes']} nodes, "
                f"{time.perf_counter() - t0:.1f} s)")
    return manifest


def _lora_plan(cfg, lora):
    """(LoRAPlan or None, manifest identities) for the DiT of `cfg`."""
    from wanrt.models.dit import WanDiT
    from wanrt.models.lora import as_specs, plan_for

    specs = as_specs(lora)
    if not specs:
        return None, []
    with torch.device("meta"):
        dit = WanDiT(cfg.dit)
    plan = plan_for(specs, dit)
    return plan, [s.identity() for s in plan.specs]


def _fetcher(ckpt, component: str, module: torch.nn.Module, lora_plan=None):
    """name -> tensor for the graph's initializers: checkpoint weights under `net.`, else derived values
    (the DiT's with the LoRAs of `lora_plan` merged in fp32)."""
    from wanrt.models.checkpoint import tied_names

    weights = ckpt.weights(_WEIGHTS[component.split("_")[0]])
    if lora_plan is not None:
        weights = lora_plan.patched(weights)
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
