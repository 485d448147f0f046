"""The codebase stays ruff-clean (rules in pyproject.toml). ruff is part of the test extra
(`pip install 'wanrt[test]'`, which scripts/test.py installs): without it this test fails, it does not skip."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"  # the one installed with the test extras
    if not ruff.exists():
        ruff = Path(shutil.which("ruff") or ruff)
    assert ruff.exists(), "ruff is not installed: pip install 'wanrt[test]' (the test extra includes it)"
    res = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
