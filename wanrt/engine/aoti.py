"""AOTInductor packages: the same graphs as the ONNX export (wanrt.export.graphs), compiled ahead of
time by torch._inductor for the target device (cpu here, cuda on a GPU machine) into .pt2 packages
that load without Python model code or compilation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from wanrt.export.specs import GraphSpec

from .graph import ContractGraph, torch_dtype


def example_inputs(spec: GraphSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Real (zero) inputs on the device: AOTInductor traces with real tensors. Timesteps must index the table."""
    return tuple(torch.zeros(t.shape, dtype=torch_dtype(t.dtype), device=device) for t in spec.inputs)


def compile_package(module: torch.nn.Module, spec: GraphSpec, path: Path, device: torch.device,
                    attention: str = "sdpa", exact_casts: bool = False) -> None:
    """torch.export + aoti_compile_and_package of `module` (real weights on `device`) -> `path`, atomically.

    exact_casts: keep every low-precision rounding of the eager model inside fused kernels (Inductor's
    emulate_precision_casts). FP8 builds need it: a bf16 rounding that Inductor skipped moves values
    across e4m3 rounding boundaries downstream (tiny fp8 DiT step: rel. L2 0.077 vs eager without, 0 per
    block with it)."""
    from wanrt.kernels import attention as attention_seam
    from wanrt.kernels import fused

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.pt2")
    args = example_inputs(spec, device)
    try:
        with warnings.catch_warnings(), attention_seam.use(attention), fused.use("torch"), torch.no_grad(), \
                torch._inductor.config.patch(emulate_precision_casts=exact_casts):
            warnings.simplefilter("ignore")
            program = torch.export.export(module, args, strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AOTIGraph(ContractGraph):
    """A loaded package under the graph contract (inputs checked and cast; its outputs are fresh tensors)."""

    capturable = True  # the compiled model launches its kernels on the current stream, no host sync
    reuses_outputs = False  # the AOTInductor runner allocates its outputs per call

    def __init__(self, path: Path, spec: GraphSpec, device: torch.device):
        super().__init__(spec, device)
        self.runner = torch._inductor.aoti_load_package(str(path))

    @torch.no_grad()
    def _run(self, args):
        out = self.runner(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]
