"""AOTInductor packages: the same graphs as the ONNX export (wanrt.export.graphs), compiled ahead of
time by torch._inductor for the target device (cpu here, cuda on a GPU machine) into .pt2 packages
that load without Python model code or compilation.

Weights: a package built from a checkpoint holds code only (Inductor's package_constants_in_so off);
its constants are the checkpoint's tensors, loaded by the model loader when the package is loaded and
handed to the runner by name (`weights=`), so a 14B DiT package is megabytes, builds without writing
33 GB, and takes any LoRA merged at load. A package built from in-memory models (the bench's random
weights: nothing on disk to read back) embeds them."""

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
                    attention: str = "sdpa", exact_casts: bool = False, embed_weights: bool = True) -> None:
    """torch.export + aoti_compile_and_package of `module` (real weights on `device`) -> `path`, atomically.

    exact_casts: keep every low-precision rounding of the eager model inside fused kernels (Inductor's
    emulate_precision_casts). FP8 builds need it: a bf16 rounding that Inductor skipped moves values
    across e4m3 rounding boundaries downstream (tiny fp8 DiT step: rel. L2 0.077 vs eager without, 0 per
    block with it). embed_weights False: the package holds no constants; AOTIGraph(weights=...) supplies them."""
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
            configs = {} if embed_weights else {"aot_inductor.package_constants_in_so": False}
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AOTIGraph(ContractGraph):
    """A loaded package under the graph contract (inputs checked and cast; its outputs are fresh tensors).

    weights: for a package built without its constants, the module (on `device`) whose parameters and
    buffers, by name, are those constants (the export module over the loaded checkpoint, wanrt.export.graphs);
    the runner reads them in place, so the graph keeps the module alive."""

    capturable = True  # the compiled model launches its kernels on the current stream, no host sync
    reuses_outputs = False  # the AOTInductor runner allocates its outputs per call

    def __init__(self, path: Path, spec: GraphSpec, device: torch.device, weights: torch.nn.Module | None = None):
        super().__init__(spec, device)
        self.runner = torch._inductor.aoti_load_package(str(path))
        self.weights = weights
        if weights is not None:
            from .manifest import EngineError

            have = {**dict(weights.named_parameters()), **dict(weights.named_buffers())}
            need = self.runner.get_constant_fqns()
            missing = [n for n in need if n not in have]
            if missing:
                raise EngineError(f"{path}: the loaded weights lack {len(missing)} of the package's constants "
                                  f"(e.g. {missing[0]}); rebuild the engine dir for this checkpoint")
            wrong = [n for n in need if have[n].device.type != device.type]
            if wrong:
                raise EngineError(f"{path}: weight {wrong[0]} is on {have[wrong[0]].device}, the package runs on "
                                  f"{device}")
            self.runner.load_constants({n: have[n] for n in need}, check_full_update=True, user_managed=True)

    @torch.no_grad()
    def _run(self, args):
        out = self.runner(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]
