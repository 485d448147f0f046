"""The graph contract: what every graph backend (ONNX Runtime, AOTInductor, TensorRT) promises its callers.

A graph is `graph(*tensors) -> list[torch.Tensor]` with the I/O spec's inputs and outputs, in spec order.
`ContractGraph` is the one place that enforces it, whatever the engine underneath does:

- inputs: the count must equal the spec's; every shape must equal the spec's static shape; the dtype
  must be of the spec's kind (a float tensor for a float input, an integer or bool tensor for an integer
  input). Then each input is cast to the spec dtype, moved to the graph's device and made contiguous.
  A mismatch is one line (GraphInputError) that names the graph, the input and what it expected.
- outputs: `graph(...)` returns tensors the caller owns and may keep across calls. An engine that
  writes into preallocated buffers (TensorRT) declares `reuses_outputs`; the contract then copies
  them out. `graph.borrow(...)` is the explicit zero-copy form: it returns the engine's own buffers,
  valid only until the next call of the same graph; callers that consume the result at once (the
  denoising step) use it.
- the engine's outputs are checked against the spec (count, shape, dtype) on the first call, so an
  engine that disagrees with its spec fails loudly instead of being misread.

Subclasses implement `_run(args) -> list[torch.Tensor]` on prepared inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from wanrt.export.specs import GraphSpec

# I/O spec dtype names -> torch dtypes (the names are torch's own, so a spec reads like the tensor)
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}


class GraphInputError(ValueError):
    """A graph was called with inputs that do not match its I/O spec."""


class GraphOutputError(RuntimeError):
    """An engine returned outputs that do not match its I/O spec (a stale or foreign engine)."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown I/O spec dtype {name!r}; known: {', '.join(DTYPES)}") from None


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "integer"  # integers and bool: token ids, masks, timesteps


def prepare_inputs(spec: GraphSpec, tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Check `tensors` against the spec's inputs, then cast/move/contiguous them to it."""
    if len(tensors) != len(spec.inputs):
        names = ", ".join(t.name for t in spec.inputs)
        raise GraphInputError(f"{spec.name}: got {len(tensors)} inputs, the graph takes {len(spec.inputs)} "
                              f"({names})")
    out = []
    for s, t in zip(spec.inputs, tensors):
        if not isinstance(t, torch.Tensor):
            raise GraphInputError(f"{spec.name}: input {s.name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(s.shape):
            raise GraphInputError(f"{spec.name}: input {s.name} has shape {tuple(t.shape)}, the engine was built "
                                  f"for {tuple(s.shape)}")
        want = torch_dtype(s.dtype)
        if _kind(t.dtype) != _kind(want):
            raise GraphInputError(f"{spec.name}: input {s.name} is {t.dtype}, the graph takes {s.dtype} "
                                  f"(a {_kind(want)} tensor)")
        out.append(t.to(device=device, dtype=want).contiguous())
    return out


def check_outputs(spec: GraphSpec, outs: Sequence[torch.Tensor]) -> None:
    got = [(tuple(o.shape), o.dtype) for o in outs]
    want = [(tuple(s.shape), torch_dtype(s.dtype)) for s in spec.outputs]
    if got != want:
        raise GraphOutputError(f"{spec.name}: the engine returned {got}, its I/O spec says {want}; "
                               "rebuild the engine from this export")


class ContractGraph:
    """Base of every graph backend; see the module docstring for the contract."""

    capturable = False  # True: the call launches device work only (a CUDA graph may record it)
    reuses_outputs = False  # True: _run returns the same buffers on every call (copied out by __call__)

    def __init__(self, spec: GraphSpec, device: torch.device):
        self.spec = spec
        self.device = torch.device(device)
        self._checked = False

    def _run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def borrow(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The outputs without a copy: valid until the next call of this graph (zero-copy callers)."""
        outs = list(self._run(prepare_inputs(self.spec, tensors, self.device)))
        if not self._checked:
            check_outputs(self.spec, outs)
            self._checked = True
        return outs

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The outputs as fresh tensors the caller may keep."""
        outs = self.borrow(*tensors)
        return [o.clone() for o in outs] if self.reuses_outputs else outs


class FunctionGraph(ContractGraph):
    """A plain function `fn(*inputs) -> outputs` under the contract (tests, stubs, small adapters)."""

    def __init__(self, fn: Callable, spec: GraphSpec, device: torch.device | str = "cpu",
                 reuses_outputs: bool = False, capturable: bool = False):
        super().__init__(spec, device)
        self.fn = fn
        self.reuses_outputs = reuses_outputs
        self.capturable = capturable

    def _run(self, args):
        out = self.fn(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]
