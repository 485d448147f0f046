"""Layers import downward only: kernels < models < export < engine < runtime < pipeline < calibration <
parallel < bench, cli. Every module's imports are parsed (function-level ones included, since a lazy
import is still a dependency) and an import of a higher layer fails this test with the offending line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wanrt"

# rank of each layer; modules not listed by prefix below are "base" (no wanrt dependency above them)
LAYERS = {
    "base": 0, "kernels": 1, "models": 2, "export": 3, "engine": 4, "runtime": 5, "pipeline": 6,
    "calibration": 7, "parallel": 8, "bench": 9, "cli": 9,
}
PREFIXES = {  # module (or package) -> layer
    "wanrt.kernels": "kernels", "wanrt.models": "models", "wanrt.export": "export", "wanrt.engine": "engine",
    "wanrt.runtime": "runtime", "wanrt.pipeline": "pipeline", "wanrt.calibration": "calibration",
    "wanrt.parallel": "parallel", "wanrt.bench": "bench", "wanrt.cli": "cli", "wanrt.__main__": "cli",
    "wanrt.doctor": "cli", "wanrt.serve": "cli", "wanrt.tiny": "cli",  # tiny: the trainer, a tool on top
    "wanrt.tiny.data": "base",  # numpy rendering of the synthetic clips (the sample frames use it)
}
BASE = ("wanrt", "wanrt._files", "wanrt.metrics", "wanrt.samples", "wanrt.video", "wanrt.schedulers")


def layer_of(module: str) -> str:
    for prefix, layer in sorted(PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module in BASE or module.startswith("wanrt.assets"):
        return "base"
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py")


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every `import` / `from ... import` in the file, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod == "wanrt":  # `from . import x` / `from wanrt import x`: x is a module
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return [(line, m) for line, m in out if m == "wanrt" or m.startswith("wanrt.")]


def violations(files, root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        mod = module_name(path, root)
        # the package facade (`wanrt.FLF2VPipeline`, lazily) sits on top; `import wanrt` itself is base
        mine = LAYERS["cli"] if mod == "wanrt" else LAYERS[layer_of(mod)]
        for line, target in imports(path, root):
            if LAYERS[layer_of(target)] > mine:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {layer_of(mod)} imports {target} "
                           f"({layer_of(target)})")
    return bad


def test_every_import_goes_down():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 40
    bad = violations(files)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """Switch the rule off by planting an upward import (export -> pipeline, inside a function): it fails."""
    fake_root = tmp_path / "wanrt"
    (fake_root / "export").mkdir(parents=True)
    bad = fake_root / "export" / "calib.py"
    bad.write_text("def f():\n    from wanrt.pipeline import FLF2VPipeline\n    from ..runtime import backends\n")
    got = violations([bad], fake_root)
    assert got == ["wanrt/export/calib.py:2: export imports wanrt.pipeline (pipeline)",
                   "wanrt/export/calib.py:3: export imports wanrt.runtime (runtime)"]


@pytest.mark.parametrize("module, layer", [("wanrt.engine.tensorrt", "engine"), ("wanrt.cli", "cli"),
                                           ("wanrt.video", "base"), ("wanrt.runtime", "runtime")])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
