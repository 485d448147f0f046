"""A pipeline whose models are split according to a ParallelPlan: load, transform, wrap the backends."""

from __future__ import annotations

from pathlib import Path

import torch

from .cfg import CFGParallelDiT
from .launch import Session
from .plan import ParallelGroups, ParallelPlan, build_groups
from .tp import apply_tp, apply_tp_t5
from .ulysses import apply_ulysses


def model_config(path: str | Path):
    """The WanConfig of a checkpoint folder (or `tiny`) without loading any weight."""
    from wanrt.models.loading import load

    return load(path, components=()).config


def dit_backend(dit, groups: ParallelGroups):
    """The DiT backend of one rank: `dit` rewritten by the plan's splits (in place; use only the result)."""
    from wanrt.runtime.backends import EagerDiT

    if groups.tp is not None:
        apply_tp(dit, groups.tp)
    if groups.ulysses is not None:
        dit = apply_ulysses(dit, groups.ulysses)
    backend = EagerDiT(dit)
    if groups.tp is not None or groups.ulysses is not None:
        # collectives inside a captured step need NCCL graph capture, not yet verified on GPUs: replay off
        backend.capturable = False
    return CFGParallelDiT(backend, groups.cfg) if groups.cfg is not None else backend


def load_pipeline(path: str | Path, plan: ParallelPlan, run: Session, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, **options):
    """FLF2VPipeline.from_pretrained for one rank of `plan` (`options` go to the pipeline). Every rank
    loads the models, then the splits rewrite them (TP keeps this rank's slices); the pipeline itself
    does not change."""
    from wanrt.pipeline import FLF2VPipeline
    from wanrt.runtime.backends import load_backends

    if run.world_size == 1 and plan.size == 1:
        return FLF2VPipeline.from_pretrained(path, device=device, dtype=dtype, **options)
    device = run.device or torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan.check(run.world_size, model_config(path))  # before the expensive load
    lora = options.pop("lora", None)
    if options.pop("precision", None) is not None:
        options.pop("fp8_keep", None)
        raise ValueError("precision='fp8' runs in one process for now: the splits rewrite nn.Linear layers, not "
                         "FP8 ones; drop --precision fp8 or the multi-GPU options")
    options.pop("fp8_keep", None)
    got = load_backends(path, device, dtype=dtype, lora=lora)  # the one assembler; the splits rewrite its models
    models, backends = got.models, got.backends
    groups = build_groups(plan)
    backends.dit = dit_backend(models.dit, groups)
    backends.names["dit"] = f"eager+{plan.describe()}"
    if groups.tp is not None:
        apply_tp_t5(models.text_encoder, groups.tp)
        backends.names["text_encoder"] = f"eager+tp{plan.tp}"
    return FLF2VPipeline(backends, got.config, got.tokenizer, device, **options)
