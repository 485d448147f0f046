"""EngineDir: the one owner of an engine dir's layout and its manifest.

    ENGINE_DIR/manifest.json                      what was built from what (engine/manifest.py)
    ENGINE_DIR/tokenizer/                         the tokenizer, so generating needs no checkpoint
    ENGINE_DIR/calibration/fp8_scales.json        FP8 activation scales (fp8 exports)
    ENGINE_DIR/onnx/<graph>.onnx                  resolution-independent graphs (t5, clip)
    ENGINE_DIR/onnx/<W>x<H>x<F>/<graph>.onnx      per-profile graphs (dit, vae_*), + .data external weights
    ENGINE_DIR/engines/tensorrt/<sub>/<graph>.plan, engines/aoti/<device>/<sub>/<graph>.pt2
"""

from __future__ import annotations

from pathlib import Path

from wanrt.export import graph_file
from wanrt.export.specs import Target

from . import engine_file
from .manifest import EngineError, Manifest


class EngineDir:
    def __init__(self, root: str | Path, manifest: Manifest | None = None):
        self.root = Path(root)
        self.manifest = manifest or Manifest.open(self.root)

    @classmethod
    def load(cls, root: str | Path) -> EngineDir:
        """An existing engine dir (its manifest must exist)."""
        return cls(root, Manifest.load(root))

    def open(self, *, source: dict, config: dict, precision: str, target: Target) -> Manifest:
        """Start (or continue, after checking it was made from the same inputs) the manifest for a build
        from `source` at `precision`, with `target`'s profile; saved, and returned for recording."""
        m = self.manifest
        m.init(checkpoint=source, config=config, precision=precision, batch=target.batch)
        m.add_profile(target.tag, target.width, target.height, target.frame_num)
        m.save()
        return m

    # -- layout ---------------------------------------------------------------------------------------

    def onnx_path(self, graph: str, target: Target) -> Path:
        return self.root / graph_file(graph, target)

    def engine_path(self, backend: str, graph: str, target: Target, device: str = "") -> Path:
        return self.root / engine_file(backend, graph, target, device)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def calibration_path(self) -> Path:
        return self.root / "calibration" / "fp8_scales.json"

    # -- integrity ------------------------------------------------------------------------------------

    def verify(self, full: bool = True) -> list[str]:
        """Every problem, one line each (empty: intact). full: re-hash every file (else size + mtime)."""
        if not self.manifest.data:
            return [f"{self.root / 'manifest.json'} not found: not an engine dir"]
        return self.manifest.verify(full)


__all__ = ["EngineDir", "EngineError"]
