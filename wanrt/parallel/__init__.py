"""Multi-process inference as transforms of built models (never flags inside wanrt/models).

- plan.py: `ParallelPlan` (ulysses x cfg, or tp), its checks, and the process groups;
- ulysses.py: `apply_ulysses(dit, axis)`, sequence parallelism with all-to-all around self-attention;
- cfg.py: `CFGParallelDiT(backend, axis)`, cond and uncond on the two ranks of a pair;
- tp.py: `apply_tp(dit, axis)`, `apply_tp_t5(t5, axis)`, Megatron-style tensor parallelism;
- launch.py: torchrun / `--nproc` launching, process-group session, rank-0 decisions;
- pipeline.py: `load_pipeline(path, plan, session)`, a pipeline with the plan applied.
See docs/parallel.md for the design and the communication model.
"""

from .cfg import CFGParallelDiT
from .launch import Session, session, spawn
from .pipeline import load_pipeline, model_config
from .plan import Axis, ParallelGroups, ParallelPlan, PlanError, build_groups
from .tp import apply_tp, apply_tp_t5
from .ulysses import apply_ulysses

__all__ = [
    "Axis", "CFGParallelDiT", "ParallelGroups", "ParallelPlan", "PlanError", "Session", "apply_tp", "apply_tp_t5",
    "apply_ulysses", "build_groups", "load_pipeline", "model_config", "session", "spawn",
]
