"""wanrt: ahead-of-time compiled inference for Wan2.1 FLF2V-14B.

`import wanrt` stays light: heavy modules (and never tensorrt) load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FLF2VPipeline", "Video", "__version__"]


def __getattr__(name: str):
    if name in ("FLF2VPipeline", "Video"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'wanrt' has no attribute {name!r}")
