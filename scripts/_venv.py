"""Create and fill the project's virtual environment (.venv) with only the standard library.

Used by scripts/demo.py and scripts/test.py so the README's two commands work on a machine that has
nothing but Python. torch is installed first and pinned to the CPU build (WANRT_TORCH overrides the
pip arguments, e.g. WANRT_TORCH="torch --index-url https://download.pytorch.org/whl/cpu").
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("WANRT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = os.environ.get("WANRT_TORCH", "torch==2.13.0")


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure(extras: str) -> Path:
    """Make .venv with wanrt[extras] installed (editable); skip the work when nothing changed."""
    stamp = VENV / f".wanrt-{extras or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and PY.exists():
        return PY
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    has_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        _run(pip + shlex.split(TORCH))  # the CPU build first, so nothing pulls a multi-GB CUDA torch
    _run(pip + ["-e", f"{ROOT}[{extras}]" if extras else str(ROOT)])
    stamp.write_text(digest)
    return PY


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else ""))
