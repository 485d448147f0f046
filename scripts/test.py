#!/usr/bin/env python3
"""Set up .venv with the test extras and run the default test suite (extra args go to pytest)."""

import subprocess
import sys

from _venv import ROOT, ensure

if __name__ == "__main__":
    py = ensure("export,test")
    sys.exit(subprocess.call([str(py), "-m", "pytest", "-q", *sys.argv[1:]], cwd=ROOT))
