"""`wanrt doctor`: which backends can run here, and why the others cannot. Imports nothing heavy eagerly."""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(module: str) -> tuple[object | None, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable", with its reason
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    return mod, getattr(mod, "__version__", "?")


def checks() -> list[Check]:
    out: list[Check] = []
    torch, v = _version("torch")
    if torch is None:
        return [Check("torch", False, v)]
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        dev = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]})"
    else:
        dev = "CPU only (no CUDA device)"
    out.append(Check("eager (torch)", True, f"torch {v}; {dev}"))

    ort, v = _version("onnxruntime")
    if ort is None:
        out.append(Check("onnxruntime", False, f"not importable ({v}); pip install 'wanrt[export]'"))
    else:
        providers = ", ".join(ort.get_available_providers())
        out.append(Check("onnxruntime", True, f"onnxruntime {v}; providers: {providers}"))

    onnx, v = _version("onnx")
    out.append(Check("onnx export", onnx is not None, f"onnx {v}" if onnx else f"not importable ({v})"))

    inductor, _ = _version("torch._inductor")
    cc = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if inductor is None:
        out.append(Check("aoti", False, "torch._inductor is not importable"))
    elif not cc:
        out.append(Check("aoti", False, "AOTInductor needs a C++ compiler (g++/clang++) on PATH"))
    else:
        where = "cuda and cpu" if torch.cuda.is_available() else "cpu (no CUDA device)"
        out.append(Check("aoti", True, f"AOTInductor via {cc}; targets {where}"))

    trt, v = _version("tensorrt")
    if trt is None:
        out.append(Check("tensorrt", False, f"not importable ({v}); install TensorRT >= 10.12 (pip 'wanrt[tensorrt]' "
                                            "on a machine that can download NVIDIA's wheels)"))
    elif not torch.cuda.is_available():
        out.append(Check("tensorrt", False, f"tensorrt {v} imports but there is no CUDA device"))
    else:
        out.append(Check("tensorrt", True, f"tensorrt {v}"))

    triton, v = _version("triton")
    if triton is None:
        out.append(Check("triton kernels", False, f"not importable ({v}); pip install triton"))
    elif torch.cuda.is_available():
        out.append(Check("triton kernels", True, f"triton {v} on CUDA"))
    else:
        out.append(Check("triton kernels", False, f"triton {v} imports, but kernels need a GPU "
                                                  "(TRITON_INTERPRET=1 runs them slowly on CPU, for tests)"))
    return out


def report() -> list[str]:
    lines = []
    for c in checks():
        lines.append(f"{'ok  ' if c.ok else 'no  '} {c.name:<16} {c.detail}")
    return lines


def verify(engine_dir) -> list[str]:
    """`wanrt doctor --verify ENGINE_DIR`: re-hash every file of an engine dir and check its manifest.
    Returns report lines; the first says whether it is intact."""
    from wanrt.engine.dir import EngineDir

    problems = EngineDir(engine_dir).verify(full=True)
    if not problems:
        return [f"ok   {engine_dir}: manifest and every file intact (full sha256)"]
    return [f"no   {engine_dir}: {len(problems)} problem(s)"] + [f"     {p}" for p in problems]


def compare(engine_dir, atol: float = 1e-2, rtol: float = 1e-2) -> list[str]:
    """`wanrt doctor --compare ENGINE_DIR`: every TensorRT engine of the dir against its ONNX graph in ONNX
    Runtime (polygraphy's Comparator, same random inputs). Returns report lines; the first says ok or not."""
    from wanrt.engine.compare import compare_with_onnxruntime
    from wanrt.engine.manifest import Manifest
    from wanrt.export.specs import Target

    m = Manifest.load(engine_dir)
    profiles = [Target(p["width"], p["height"], p["frame_num"], m.batch) for p in m.profiles.values()]
    lines, failed = [], 0
    for key, e in m.section("engines").items():
        if e.get("backend") != "tensorrt":
            continue
        tag = key.partition("@")[2]
        target = next((t for t in profiles if not tag or t.tag == tag), None)
        try:
            report = compare_with_onnxruntime(engine_dir, e["graph"], target, atol, rtol)
            worst = max(r["max_rel"] for r in report.values())
            lines.append(f"     {key}: ok (max relative error {worst:.2e})")
        except RuntimeError as err:
            failed += 1
            lines.append(f"     {key}: {err}")
    if not lines:
        return [f"no   {engine_dir}: no TensorRT engines to compare (build with --backend tensorrt)"]
    head = "ok  " if not failed else "no  "
    return [f"{head} {engine_dir}: {len(lines) - failed}/{len(lines)} TensorRT engines match ONNX Runtime"] + lines
