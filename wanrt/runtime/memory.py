"""Where the models live while each stage runs, as one policy object (not flags through the code).

- resident:   everything stays on the compute device (fastest; needs memory for all four models).
- sequential: the DiT stays on the device; T5, CLIP and the VAE are moved there only for their own
              stage and back to the offload device (CPU) afterwards.
- t5_cpu:     like resident, but the T5 encoder always runs on the CPU (its output is moved over).

The policy also measures the peak memory of every stage: CUDA peak allocation on a GPU, peak RSS
(VmHWM, reset per stage) on the CPU. Engine backends (ONNX Runtime, AOTInductor, TensorRT) own their
memory; the policy then only measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODES = ("resident", "sequential", "t5_cpu")
STAGES = ("text_encoder", "image_encoder", "vae_encode", "denoise", "vae_decode")
_USES = {"text_encoder": "text_encoder", "image_encoder": "image_encoder", "vae_encode": "vae",
         "denoise": "dit", "vae_decode": "vae"}


class MemoryPolicy:
    def __init__(self, mode: str = "resident", offload_device: str | torch.device = "cpu"):
        if mode not in MODES:
            raise ValueError(f"unknown memory policy {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode
        self.offload = torch.device(offload_device)
        self.modules: dict[str, torch.nn.Module] = {}
        self.device = torch.device("cpu")
        self.peaks: dict[str, int] = {}

    def attach(self, modules: dict[str, torch.nn.Module], device: torch.device) -> None:
        """The eager modules by component (text_encoder, image_encoder, vae, dit) and the compute device."""
        self.modules, self.device = dict(modules), torch.device(device)
        for name, where in self.placement(None).items():
            self._move(name, where)

    def placement(self, stage: str | None) -> dict[str, torch.device]:
        """Where each component should be during `stage` (None: between requests)."""
        active = _USES.get(stage)
        out = {}
        for name in ("text_encoder", "image_encoder", "vae", "dit"):
            if name == "dit" or self.mode == "resident":
                out[name] = self.device
            elif self.mode == "t5_cpu":
                out[name] = self.offload if name == "text_encoder" else self.device
            else:  # sequential
                out[name] = self.device if name == active else self.offload
        return out

    def input_device(self, component: str) -> torch.device:
        """Where inputs of `component` must be (the T5 of t5_cpu runs on the CPU)."""
        return self.offload if (self.mode == "t5_cpu" and component == "text_encoder") else self.device

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        for component, where in self.placement(name).items():
            self._move(component, where)
        _reset_peak(self.device)
        try:
            yield
        finally:
            self.peaks[name] = _peak(self.device)

    def _move(self, component: str, device: torch.device) -> None:
        module = self.modules.get(component)
        if module is None:
            return
        current = next(module.parameters()).device
        if current != device:
            module.to(device)  # parameters and (derived) buffers alike
            if device.type == "cpu" and self.device.type == "cuda":
                torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: "5" resets the peak RSS (VmHWM) of this process
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
