"""`wanrt build`: compiled engines per target in an engine dir, recorded in its manifest.

- tensorrt: plans built from the exported ONNX (exported first when missing), one per graph.
- aoti: AOTInductor packages compiled from the PyTorch graphs for the target device.
Files: ENGINE_DIR/engines/<backend>/<...>/<graph>.{plan,pt2}; manifest section "engines", keyed
"<backend>:<graph>[@WxHxF]", with the library versions and device each was built for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wanrt.export import COMPONENTS, GRAPHS, graph_file, graph_key
from wanrt.export.specs import TABLE, Target, check_components, graph_specs, resolution_dependent

BACKENDS = ("tensorrt", "aoti")


def engine_key(backend: str, graph: str, target: Target) -> str:
    return f"{backend}:{graph_key(graph, target)}"


def engine_file(backend: str, graph: str, target: Target, device: str = "") -> str:
    sub = target.tag if resolution_dependent(graph) else "shared"
    if backend == "aoti":
        return f"engines/aoti/{device}/{sub}/{graph}.pt2"
    return f"engines/tensorrt/{sub}/{graph}.plan"


def build(ckpt_dir: str | Path | None, out: str | Path, target: Target, backend: str = "aoti", precision: str = "bf16",
          components=COMPONENTS, device: str | None = None, force: bool = False,
          log: Callable[[str], None] = print, attention: str = "sdpa", models=None, lora=None, **trt_options):
    """Build `backend` engines of `components` for `target` into the engine dir `out`; returns its Manifest.

    aoti only: `models` (a loaded WanModels, e.g. random weights made on the GPU) replaces the checkpoint
    (ckpt_dir may then be None); the manifest records them as in-memory weights.
    lora: [(file, scale), ...] merged into the DiT (see LORA_SWAP for what another LoRA costs per backend);
    tensorrt only: aoti packages hold no weights and take their LoRAs when loaded."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown build backend {backend!r}; choose from {', '.join(BACKENDS)}")
    components = check_components(components)
    if models is not None and lora:
        raise ValueError("LoRAs merge at checkpoint load; pass them to models.loading.load for in-memory models")
    if backend == "aoti" and lora:
        raise ValueError("aoti packages built from a checkpoint hold no weights; pass the LoRAs when loading them "
                         "(wanrt generate --backend aoti --lora ...), not to the build")
    if backend == "tensorrt":
        from .tensorrt import require

        require()  # fail at once, before any export work
        return _build_tensorrt(ckpt_dir, Path(out), target, precision, components, force, log, trt_options, lora)
    return _build_aoti(ckpt_dir, Path(out), target, precision, components, device, force, log, attention, models)


# What a LoRA swap (same checkpoint, other LoRA files or scales) costs per backend; `wanrt build/export
# --lora ...` on the same engine dir does exactly this, and the pipeline refuses a DiT built with other LoRAs.
LORA_SWAP = {
    "onnxruntime": "re-export of the DiT graph's weights (the other graphs stay); no build step exists",
    "aoti": "nothing for packages built from a checkpoint (they hold no weights: the LoRAs given at load are merged "
            "as the checkpoint is read); a recompile of the DiT package built from in-memory weights",
    "tensorrt": "with --strip_weights (bf16/fp32): re-export of the DiT ONNX weights, and the weight-stripped plan "
                "is refitted from them at load (no TensorRT build while the graph proto is unchanged, i.e. weights "
                "stored as external data: every full-size model); otherwise (and for fp8, recalibrated): a rebuild "
                "of the DiT plan",
}


def built_lora(m, backend: str, target: Target) -> list[dict] | None:
    """The LoRAs ([{file, sha256, scale}]) in the weights the `backend` DiT of `target` runs with, or None
    when the engine dir does not say (built before LoRA support)."""
    if backend == "onnxruntime":
        e = m.entry("graphs", graph_key("dit", target))
    else:
        e = m.entry("engines", engine_key(backend, "dit", target))
        if e is not None and backend == "tensorrt" and e.get("settings", {}).get("strip_weights"):
            e = m.entry("graphs", graph_key("dit", target))  # refitted from the ONNX weights at load
    return None if e is None else e.get("lora", [])


def check_lora(m, backend: str, target: Target, lora) -> None:
    """One-line EngineError when the engine dir's DiT was built with LoRAs other than `lora`."""
    from wanrt.engine.manifest import EngineError
    from wanrt.models.lora import identities

    e = m.entry("engines", engine_key(backend, "dit", target))
    if backend == "aoti" and e is not None and e.get("weights") == "checkpoint":
        return  # a package without weights: the LoRAs are merged as the checkpoint is read at load
    want = identities(lora)
    have = built_lora(m, backend, target)
    if have is None:
        return  # no DiT engine for this target: the loader says so
    if [(d["sha256"], d["scale"]) for d in have] != [(d["sha256"], d["scale"]) for d in want]:
        def show(ids):
            return ", ".join(f"{d['file']}:{d['scale']:g}" for d in ids) or "no LoRA"

        raise EngineError(f"{m.root}: the {backend} DiT was built with {show(have)}, not {show(want)}; rebuild it "
                          f"with `wanrt build/export --lora ...` ({LORA_SWAP[backend]})")


def _build_aoti(ckpt_dir, out: Path, target, precision, components, device, force, log, attention, models=None):
    from wanrt.export import _copy_tokenizer
    from wanrt.export.graphs import graph_module
    from wanrt.models.loading import Checkpoint

    from .aoti import compile_package
    from .dir import EngineDir

    if precision not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"aoti builds fp32, bf16 or fp8 (got {precision!r})")
    if precision == "fp8" and models is not None and not _fp8_quantized(models):
        raise ValueError("an fp8 aoti build of in-memory models needs them quantised first "
                         "(wanrt.kernels.fp8.quantize_blocks on models.dit.blocks)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if models is None:
        ckpt = Checkpoint(ckpt_dir)
        cfg = ckpt.config
        source = {"path": str(ckpt.folder), "layout": ckpt.layout, "fingerprint": ckpt.fingerprint()}
    else:  # in-memory weights: identified by their origin and config, nothing on disk to hash
        import hashlib
        import json

        ckpt, cfg = None, models.config
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
        source = {"path": models.source or "in-memory", "layout": "memory", "fingerprint": f"memory-{digest}"}
    specs = graph_specs(cfg, target)
    manifest = EngineDir(out).open(source=source, config=dataclasses.asdict(cfg), precision=precision, target=target)
    if ckpt is not None:
        _copy_tokenizer(ckpt, out)
    elif models.text_encoder is not None and models.text_encoder.tokenizer is not None:
        models.text_encoder.tokenizer.save_pretrained(str(out / "tokenizer"))
    manifest.save()
    # weights "checkpoint": packages of code only, their constants read from the checkpoint at load (with
    # any LoRA merged then); "embedded": in-memory models, which nothing could read back later
    weights = "checkpoint" if ckpt is not None else "embedded"
    facts = {"device": dev.type, "torch": torch.__version__, "attention": attention, "weights": weights,
             "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    todo = []
    for c in components:
        for g in GRAPHS[c]:
            key = engine_key("aoti", g, target)
            extra = {"lora": []} if g == "dit" and weights == "embedded" else {}  # LoRAs are refused above
            if not force and manifest.is_current("engines", key, spec=specs[g].to_dict(), **facts, **extra):
                log(f"{key}: up to date")
            else:
                todo.append((c, g))
    if "dit" in components:
        from .exporter import time_module, write_time_table

        write_time_table(manifest, (lambda: models.dit) if models is not None else (lambda: time_module(ckpt)),
                         force, log)
    if not todo:
        return manifest
    if models is None:
        # fp8: the bf16 map with the DiT block GEMMs in FP8 (wanrt.kernels.fp8), compiled as they run eagerly
        parts = sorted({TABLE[c].weights for c, _ in todo})
        models = load_for_aoti(ckpt_dir, precision, parts, dev)  # no LoRA: the package holds no weights
    missing = sorted({TABLE[c].weights for c, _ in todo if getattr(models, TABLE[c].weights) is None})
    if missing:
        raise ValueError(f"the in-memory models lack {missing} needed for {[g for _, g in todo]}")
    for component, graph in todo:
        key = engine_key("aoti", graph, target)
        rel = engine_file("aoti", graph, target, dev.type)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"{key}: compiling with AOTInductor for {dev.type}")
        t0 = time.perf_counter()
        compile_package(graph_module(graph, models, target), specs[graph], path, dev, attention,
                        exact_casts=precision == "fp8", embed_weights=weights == "embedded")
        seconds = round(time.perf_counter() - t0, 1)
        extra = {"lora": []} if graph == "dit" and weights == "embedded" else {}
        manifest.record("engines", key, [rel], backend="aoti", component=component, graph=graph,
                        spec=specs[graph].to_dict(), build_seconds=seconds, **facts, **extra)
        log(f"{key}: {rel} ({path.stat().st_size / 1e6:.1f} MB, {seconds} s)")
    return manifest


def load_for_aoti(ckpt_dir, precision: str, parts, device: torch.device, lora=None):
    """The models AOTInductor packages of `precision` run with: built over them, and (packages without
    embedded weights) their constants at load. fp8: the bf16 map with the DiT block GEMMs in FP8."""
    from wanrt.models.loading import load

    return load(ckpt_dir, device=device, dtype=None if precision == "fp32" else torch.bfloat16,
                components=parts, precision="fp8" if precision == "fp8" else None,
                lora=lora if "dit" in parts else None)


def _fp8_quantized(models) -> bool:
    from wanrt.kernels.fp8 import is_quantized

    return models.dit is None or is_quantized(models.dit)


def _build_tensorrt(ckpt_dir, out: Path, target, precision, components, force, log, options, lora=None):
    from wanrt.models.lora import identities

    from . import tensorrt as trt_build
    from .exporter import export

    graph_attention = options.pop("graph_attention", "matmul")
    fp8_attention = options.pop("fp8_attention", False)
    manifest = export(ckpt_dir, out, target, precision=precision, components=components, force=force, log=log,
                      graph_attention=graph_attention, fp8_attention=fp8_attention, lora=lora)
    lora_ids = identities(lora)
    specs = {k: v for k, v in graph_specs(_config(manifest), target).items()}
    trt = trt_build.require()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    # timing results are only valid for one TensorRT version on one GPU architecture
    cache = out / "engines" / "tensorrt" / f"timing-trt{trt.__version__}-sm{props.major}{props.minor}.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    for component in components:
        for graph in GRAPHS[component]:
            key = engine_key("tensorrt", graph, target)
            settings = trt_build.settings_for(specs[graph], **options)
            onnx_rel = graph_file(graph, target)
            onnx_sha = manifest.entry("graphs", graph_key(graph, target))["files"][onnx_rel]
            # a weight-stripped plan takes its weights (LoRAs included) from the ONNX at load: refit, no rebuild;
            # not for fp8, whose Q/DQ scales are recalibrated with the LoRA (a scale change may need a rebuild)
            refit = settings.strip_weights and precision != "fp8"
            extra = {"lora": lora_ids} if graph == "dit" and not refit else {}
            if not force and manifest.is_current("engines", key, settings=settings.to_dict(), onnx_sha256=onnx_sha,
                                                 **extra):
                log(f"{key}: up to date")
                continue
            rel = engine_file("tensorrt", graph, target)
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            facts = trt_build.build_plan(out / onnx_rel, path, specs[graph], settings, cache, log)
            manifest.record("engines", key, [rel], backend="tensorrt", component=component, graph=graph,
                            spec=specs[graph].to_dict(), settings=settings.to_dict(), onnx=onnx_rel,
                            onnx_sha256=onnx_sha, **facts, **extra)
            log(f"{key}: {rel} ({facts['plan_bytes'] / 1e6:.1f} MB, {facts['build_seconds']} s)")
    return manifest


def _config(manifest):
    return manifest.config()
