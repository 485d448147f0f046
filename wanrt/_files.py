"""Atomic writes leave files with the permissions a plain open() would have given them.

tempfile.mkstemp creates its file 0600 so that no one else can read it while it is written; renamed
into place it would stay 0600, and a video or manifest written for a web server or another user
would be unreadable to them. `as_if_opened` applies the process's umask to 0666 instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    try:  # Linux: read it without changing it (os.umask() can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_opened(path: str | Path) -> None:
    """chmod `path` (a file made by mkstemp) to 0666 minus the umask."""
    os.chmod(path, 0o666 & ~umask())
