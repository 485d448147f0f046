"""What the bench runs on: device description, dense peak throughput, synchronisation and memory probes.

Peaks are NVIDIA datasheet dense BF16/FP16 tensor-core TFLOP/s (half the "with sparsity" figures), see
../shared/spec/anchors.md section 7. `% of peak` is always against this BF16 figure, whatever precision
the run used, so fp32 and bf16 rows are comparable on one scale. CPUs have no entry: "n/a".
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from dataclasses import dataclass

import torch

# Matched as substrings of torch.cuda.get_device_name(), most specific first ("H100 PCIe" before
# "H100", "H200" before "H20"). SXM H100 reports e.g. "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.2),
)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense BF16 peak of a GPU by its name, None when unknown (or a CPU)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa() -> str:
    """The CPU features that decide which kernels PyTorch and ONNX Runtime run (the same bench gives other
    ratios on an AVX2-only Xeon than on an AVX-512-BF16 EPYC), and torch's own dispatch level."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = [f for f in ISA_FLAGS if f in flags]
    with contextlib.suppress(AttributeError):  # older torch
        have.append(f"torch:{torch.backends.cpu.get_cpu_capability()}")
    return " ".join(have) or platform.machine()


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cpu" | "cuda"
    name: str
    index: int | None
    peak_bf16_tflops: float | None
    threads: int  # torch intra-op threads (CPU work, and host work on a GPU run)
    memory_bytes: int | None  # total device memory (CUDA); None on the CPU
    isa: str = ""  # the host CPU's vector/matrix features (cpu_isa())

    @property
    def label(self) -> str:
        if self.type == "cuda":
            return f"cuda:{self.index} {self.name}"
        return f"cpu ({self.name}, {self.threads} threads, {self.isa})"

    def to_dict(self) -> dict:
        return {"type": self.type, "name": self.name, "index": self.index, "label": self.label,
                "peak_bf16_tflops": self.peak_bf16_tflops, "threads": self.threads,
                "memory_bytes": self.memory_bytes, "isa": self.isa}


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo("cuda", props.name, index, peak_tflops(props.name), torch.get_num_threads(),
                          props.total_memory, cpu_isa())
    return DeviceInfo("cpu", cpu_name(), None, None, torch.get_num_threads(), None, cpu_isa())


def versions() -> dict[str, str]:
    """wanrt, python, torch (+ CUDA/cuDNN when present) and every backend library that imports."""
    from wanrt.engine.manifest import versions as library_versions

    out = {"python": sys.version.split()[0], **library_versions()}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if torch.cuda.is_available() and torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory -----------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of one call, in bytes: `start()` before it, `stop()` after it -> (peak, delta).

    CUDA: the torch caching allocator's peak (reset before the call); delta = peak - allocated before.
    Memory that a library allocates outside torch (ONNX Runtime's CUDA arena, a TensorRT workspace) is
    not seen there, so `device_used_bytes` (driver view: total - free) is recorded too.
    CPU: peak resident set size. Linux resets the high-water mark when "5" is written to
    /proc/self/clear_refs; without that (other OSes, restricted /proc) the process-lifetime maximum is
    the best available and `kind` says so ("rss_lifetime").
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else ("rss" if self._can_reset_rss() else "rss_lifetime")
        self._before = 0

    @staticmethod
    def _can_reset_rss() -> bool:
        if _status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        if self.kind == "cuda":
            return torch.cuda.memory_allocated(self.device)
        rss = _status_kb("VmRSS")
        return rss * 1024 if rss is not None else 0

    def start(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self._before = self.current()

    def stop(self) -> tuple[int, int]:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "rss":
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
        return peak, max(peak - self._before, 0)

    def device_used(self) -> int | None:
        if self.kind != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
