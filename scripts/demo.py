#!/usr/bin/env python3
"""Set up .venv and run the main job: the built-in tiny model to an mp4 (demo.mp4)."""

import subprocess
import sys

from _venv import BIN, ensure

if __name__ == "__main__":
    ensure("")
    args = sys.argv[1:] or ["--ckpt_dir", "tiny", "--size", "64*64", "--frame_num", "9", "--save_file", "demo.mp4"]
    sys.exit(subprocess.call([str(BIN / "wanrt"), "generate", *args]))
