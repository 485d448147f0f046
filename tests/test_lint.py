"""The codebase stays ruff-clean (rules in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"  # the one installed with the test extras
    if not ruff.exists():
        ruff = Path(shutil.which("ruff") or ruff)
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install 'wanrt[test]')")
    res = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
