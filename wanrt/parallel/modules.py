"""Building blocks shared by the splits: re-basing a built module onto a parallel subclass.

A split replaces a submodule (say `blocks.3.self_attn`) by an instance of a subclass that shares the
original's parameters, buffers and children. The state_dict keys stay the official ones, no weight is
copied, and the model file keeps no trace of parallelism.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch.nn as nn

M = TypeVar("M", bound=nn.Module)


def rebase(module: nn.Module, cls: type[M], **attrs) -> M:
    """A new `cls` object with module's state, plus `attrs`. `module` must be an instance of cls's base
    class (e.g. wanrt's Linear, an nn.Linear, can become a RowParallelLinear(nn.Linear)), since
    `cls` reads the state its base defines.

    The per-instance registries (_parameters, _modules, hooks, ...) are shallow-copied, so later
    replacements in the new module do not leak back into the old one; tensors and children are shared.
    """
    if not isinstance(module, cls.__bases__):
        raise TypeError(f"cannot rebase a {type(module).__name__} onto {cls.__name__}")
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    for k, v in attrs.items():
        setattr(new, k, v)
    return new
