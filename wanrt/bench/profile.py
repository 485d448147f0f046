"""`wanrt bench --profile`: where one call's time goes, per op class (torch.profiler).

Every profiled op's SELF time (device time on CUDA, CPU time otherwise; nested ops are not counted
twice) lands in one class. On CUDA the kernels themselves are events too: they are not counted again
(their time is already their op's); kernels no op launched (e.g. outside any aten/wanrt op) go to other,
so the classes add up to the device's busy time. The classes:
- attention: SDPA and its backends, our Triton attention ops (wanrt::flash_attention / sage_attention);
- gemm: matmuls, linears' addmm, _scaled_mm (FP8), convolutions;
- elementwise: memory-bound pointwise work and reductions (norms, casts, copies, adds, GELU, RoPE,
  quantisation, our fused norm kernels);
- other: everything else (allocation, views, host work).
Achieved rates: TFLOP/s for attention (4 * B * H * Lq * Lk * D per call) and GEMMs (2 * M * N * K,
the profiler's count where it has one); GB/s for elementwise, from an ESTIMATE of the bytes moved
(every input read once + one output the size of the largest input written).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CLASSES = ("attention", "gemm", "elementwise", "other")

_ATTENTION = ("attention", "sdpa", "flash", "sage", "cudnn_attn", "efficient_attn")
_GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::convolution",
         "aten::_convolution", "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_int_mm",
         "aten::addmv", "aten::mv", "aten::dot", "aten::_addmm_activation")
_OTHER = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape",
          "aten::as_strided", "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::slice",
          "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::chunk", "aten::split", "aten::unflatten",
          "aten::flatten", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::resolve_conj",
          "aten::resolve_neg", "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense", "aten::narrow",
          "aten::contiguous", "aten::linear", "aten::matmul", "aten::scaled_dot_product_attention")
_SIZES = {"float": 4, "float32": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
          "c10::Float8_e4m3fn": 1, "signed char": 1, "unsigned char": 1, "bool": 1, "c10::Float8_e5m2": 1}


def classify(name: str) -> str:
    low = name.lower()
    if name in _OTHER or not (name.startswith("aten::") or name.startswith("wanrt::")):
        return "other"
    if any(k in low for k in _ATTENTION):
        return "attention"
    if name in _GEMM:
        return "gemm"
    return "elementwise"


def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def _flops(name: str, shapes: list, event_flops: int) -> int:
    """FLOPs of one op from its input shapes (the profiler's own count for the matmuls it knows)."""
    if classify(name) == "attention" and len(shapes) >= 3 and len(shapes[0]) == 4 and len(shapes[1]) == 4:
        q, k = shapes[0], shapes[1]
        lk = k[1] if name.startswith("wanrt::") else k[-2]  # ours: (B, L, H, D); aten: (B, H, L, D)
        return 4 * _numel(q) * lk
    if name == "aten::_scaled_mm" and len(shapes) >= 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * n * k
    return int(event_flops or 0)


def _bytes(shapes: list, dtypes: list) -> int:
    sizes = [_numel(s) * _SIZES.get(d, 4) for s, d in zip(shapes, dtypes) if s]
    return sum(sizes) + max(sizes, default=0)


def _is_device_event(e) -> bool:
    """A kernel (or memcpy/memset) event, as opposed to the op on the host that launched it."""
    from torch.autograd import DeviceType

    return getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU


def breakdown(events, device_type: str) -> dict:
    """{class: {time_s, calls, flops, bytes, tflops, gbps, share}} from profiler events, plus 'total_s'."""
    out = {c: {"time_s": 0.0, "calls": 0, "flops": 0, "bytes": 0} for c in CLASSES}
    kernels_us = 0.0  # CUDA: the device's busy time, summed over the kernel events themselves
    for e in events:
        name = e.key if hasattr(e, "key") else e.name
        us = e.self_device_time_total if device_type == "cuda" else e.self_cpu_time_total
        if device_type == "cuda" and _is_device_event(e):
            kernels_us += us  # already in its op's self device time: counting it here too doubled the total
            continue
        c = classify(name)
        if device_type == "cuda" and us == 0 and c != "other":
            continue  # the op's kernels ran under a child op that carries the time
        slot = out[c]
        slot["time_s"] += us * 1e-6
        slot["calls"] += 1
        shapes = list(getattr(e, "input_shapes", None) or [])
        if c in ("attention", "gemm"):
            slot["flops"] += _flops(name, shapes, getattr(e, "flops", 0))
        elif c == "elementwise":
            slot["bytes"] += _bytes(shapes, list(getattr(e, "input_dtypes", None) or []))
    if device_type == "cuda":
        unattributed = kernels_us * 1e-6 - sum(v["time_s"] for v in out.values())
        if unattributed > 0:  # kernels no profiled op launched
            out["other"]["time_s"] += unattributed
    total = sum(v["time_s"] for v in out.values())
    for v in out.values():
        t = v["time_s"]
        v["tflops"] = round(v["flops"] / t / 1e12, 4) if (t and v["flops"]) else None
        v["gbps"] = round(v["bytes"] / t / 1e9, 3) if (t and v["bytes"]) else None
        v["share"] = round(t / total, 4) if total else None
        v["time_s"] = round(t, 6)
    return {"total_s": round(total, 6), "classes": out,
            "method": "torch.profiler self time per op; elementwise bytes estimated (inputs + one output)"}


def profile_call(call: Callable[[], object], device: torch.device) -> dict:
    """Run `call` once under torch.profiler (CPU + CUDA activities on CUDA) and return its breakdown."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof, torch.no_grad():
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return breakdown(prof.events(), device.type)


def format_line(backend: str, component: str, prof: dict) -> str:
    parts = []
    for c in CLASSES:
        v = prof["classes"][c]
        rate = f", {v['tflops']:.3g} TFLOP/s" if v["tflops"] else (f", {v['gbps']:.3g} GB/s" if v["gbps"] else "")
        share = f" ({100 * v['share']:.0f}%)" if v["share"] is not None else ""
        parts.append(f"{c} {v['time_s'] * 1e3:.1f} ms{share}{rate}")
    return f"{component} {backend}: " + "; ".join(parts)
