#!/usr/bin/env python3
"""Set up .venv and run the main job: the built-in tiny model to an mp4 (demo.mp4)."""

import subprocess
import sys

from _venv import BIN, ensure

if __name__ == "__main__":
    ensure("")
    args = sys.argv[1:] or ["--ckpt_dir", "tiny", "--save_file", "demo.mp4"]  # 64*64 x 17 frames, 50 steps
    sys.exit(subprocess.call([str(BIN / "wanrt"), "generate", *args]))
