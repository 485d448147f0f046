"""The export layer: the component table and I/O specs (specs.py), the export units (graphs.py), trace ->
ONNX with streamed weights (onnx.py) and the FP8 Q/DQ pass (fp8.py). Nothing here knows the engine dir:
`wanrt.engine.export` writes the graphs into one (ENGINE_DIR/onnx/..., manifest.json, tokenizer/).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .specs import COMPONENTS, GRAPHS, TABLE, Target, resolution_dependent

__all__ = ["COMPONENTS", "GRAPHS", "TABLE", "graph_file", "graph_key"]


def graph_key(graph: str, target: Target) -> str:
    return f"{graph}@{target.tag}" if resolution_dependent(graph) else graph


def graph_file(graph: str, target: Target) -> str:
    return f"onnx/{target.tag}/{graph}.onnx" if resolution_dependent(graph) else f"onnx/{graph}.onnx"


def lora_plan(cfg, lora):
    """(LoRAPlan or None, manifest identities) for the DiT of `cfg`; every LoRA checked, nothing read."""
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

    weights = ckpt.weights(TABLE[component].weights)
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


def _copy_tokenizer(ckpt, out: Path) -> None:
    """The engine dir carries its tokenizer, so generating from it needs no checkpoint."""
    dest = out / "tokenizer"
    if (dest / "tokenizer_config.json").is_file():
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))  # its own name: builds may run side by side
    try:
        ckpt.tokenizer().save_pretrained(str(tmp))
        if not (dest / "tokenizer_config.json").is_file():  # unless another build put it there meanwhile
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
    except OSError:
        if not (dest / "tokenizer_config.json").is_file():  # lost the rename to another build: theirs stands
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
