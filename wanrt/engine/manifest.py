"""manifest.json: what an engine dir holds, built from what, and how to check it before loading.

The manifest is rewritten atomically after each finished file, and only lists files that are
complete (their sha256 recorded), so a crash never leaves a manifest that claims an unfinished file.
Several processes may export or build into one engine dir at once (e.g. the VAE and the DiT side by side):
each save holds a lock on the dir and merges the entries this process recorded into the manifest on disk,
so no process drops another's entries.

Integrity, at three costs:
- the manifest's own fields (checkpoint, config, precision, batch, versions, profiles, every entry) are
  covered by a sha256 of their canonical JSON, stored as "integrity" and checked on load: an edited
  batch or config is refused instead of silently changing the shapes;
- at load, every file is checked by size + mtime against what was recorded when it was written; a file
  whose size or mtime differs is re-hashed and must match its recorded sha256 (a copied dir passes);
- on demand (`wanrt doctor --verify ENGINE_DIR`), every file is re-hashed in full.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from wanrt._files import as_if_opened

FORMAT = 2  # 2: "integrity" over the manifest itself, per-file size + mtime
NAME = "manifest.json"
SECTIONS = ("profiles", "graphs", "engines", "tables")  # {key: entry} maps that several writers may fill
IDENTITY = ("format", "checkpoint", "config", "precision", "batch")  # what every writer of one dir must share


class EngineError(Exception):
    """An engine dir is missing, incomplete, corrupted or built for something else."""


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        as_if_opened(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    import importlib

    import wanrt

    out = {"wanrt": wanrt.__version__}
    for mod in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: simply not recorded
            continue
    return out


@contextlib.contextmanager
def _dir_lock(root: Path):
    """An exclusive lock on the engine dir itself (flock on its directory fd: no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the caller's business
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass
class Manifest:
    root: Path
    data: dict = field(default_factory=dict)
    # (section, key) of the entries this process wrote: they win over the disk's when saving
    touched: set = field(default_factory=set, repr=False, compare=False)

    # -- life cycle -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> Manifest:
        """Read ROOT/manifest.json (an empty manifest when there is none)."""
        root = Path(root)
        path = root / NAME
        if not path.is_file():
            return cls(root, {})
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EngineError(f"cannot read {path}: {e}; delete the engine dir and rebuild") from None
        if data.get("format") != FORMAT:
            raise EngineError(f"{path} has format {data.get('format')!r}, this wanrt reads format {FORMAT}; "
                              "rebuild the engine dir with this version")
        return cls(root, data)

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Like open, but an engine dir without a manifest is an error."""
        m = cls.open(root)
        if not m.data:
            raise EngineError(f"{Path(root) / NAME} not found: {root} is not an engine dir "
                              "(create one with `wanrt export` or `wanrt build`)")
        return m

    def init(self, *, checkpoint: dict, config: dict, precision: str, batch: int) -> None:
        """Start a manifest, or check that an existing one was made from the same inputs."""
        if not self.data:
            self.data = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
                         "checkpoint": checkpoint, "config": config, "precision": precision, "batch": batch,
                         "profiles": {}, "graphs": {}, "engines": {}}
            return
        d = self.data
        problems = []
        if d["checkpoint"].get("fingerprint") != checkpoint.get("fingerprint"):
            old = d["checkpoint"]
            problems.append(f"checkpoint {old.get('path')} (fingerprint {old.get('fingerprint')})")
        if d["precision"] != precision:
            problems.append(f"precision {d['precision']}")
        if d["batch"] != batch:
            problems.append(f"DiT batch {d['batch']}")
        if problems:
            raise EngineError(f"{self.root} was built from {', '.join(problems)}; use another --out, or --force "
                              "to rebuild it for the new inputs")

    def save(self) -> None:
        """Write the manifest; under the dir's lock, entries another process saved meanwhile are kept (the
        disk's manifest overlaid with the entries this one recorded), when both were made from the same inputs."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _dir_lock(self.root):
            disk = _read(self.root / NAME)
            if disk is not None and _intact(disk) and _canon([disk.get(k) for k in IDENTITY]) == \
                    _canon([self.data.get(k) for k in IDENTITY]):
                for section in SECTIONS:
                    merged = dict(disk.get(section, {}))
                    merged.update({k: v for k, v in self.data.get(section, {}).items()
                                   if (section, k) in self.touched})
                    self.data[section] = merged
                self.data["created"] = disk.get("created", self.data.get("created"))
            self.data["versions"] = versions()
            self.data["integrity"] = self.digest()
            write_json_atomic(self.root / NAME, self.data)

    def digest(self) -> str:
        """sha256 of the manifest's canonical JSON without its own "integrity" field."""
        return _digest(self.data)

    def check_integrity(self) -> None:
        """The manifest's fields are as written (batch, config, versions, entries: nothing edited by hand)."""
        if self.data.get("integrity") != self.digest():
            raise EngineError(f"{self.root / NAME} was changed after wanrt wrote it (its fields no longer match "
                              "its integrity hash); rebuild the engine dir with --force")

    # -- typed view --------------------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def batch(self) -> int:
        return self.data["batch"]

    @property
    def checkpoint(self) -> dict:
        return self.data["checkpoint"]

    @property
    def profiles(self) -> dict:
        return self.data.get("profiles", {})

    @property
    def versions(self) -> dict:
        return self.data.get("versions", {})

    def section(self, name: str) -> dict:
        """{key: entry} of one section ('graphs', 'engines', 'tables'); empty when absent."""
        return self.data.get(name, {})

    def config(self):
        from wanrt.models.config import WanConfig

        return WanConfig.from_dict(self.data["config"])

    # -- entries --------------------------------------------------------------------------------------

    def add_profile(self, tag: str, width: int, height: int, frame_num: int) -> None:
        self.data["profiles"][tag] = {"width": width, "height": height, "frame_num": frame_num}
        self.touched.add(("profiles", tag))

    def record(self, section: str, key: str, files: list[str], **info) -> None:
        """Record finished files (paths relative to root) with their sha256, then save."""
        entry = dict(info)
        entry["files"] = {f: sha256(self.root / f) for f in files}
        entry["stats"] = {f: _stat(self.root / f) for f in files}
        self.data.setdefault(section, {})[key] = entry
        self.touched.add((section, key))
        self.save()

    def entry(self, section: str, key: str) -> dict | None:
        return self.data.get(section, {}).get(key)

    def is_current(self, section: str, key: str, **expect) -> bool:
        """True when the entry exists, its files hash as recorded, and its recorded fields equal `expect`."""
        e = self.entry(section, key)
        if e is None or any(e.get(k) != json.loads(json.dumps(v)) for k, v in expect.items()):  # tuples -> lists
            return False
        return all(self._file_ok(e, f) for f in e["files"])

    def _file_ok(self, e: dict, f: str, full: bool = False) -> bool:
        p = self.root / f
        if not p.is_file():
            return False
        if not full and e.get("stats", {}).get(f) == _stat(p):
            return True  # unchanged since it was hashed: same size and mtime
        return sha256(p) == e["files"][f]

    def verify_files(self, section: str, key: str, full: bool = False) -> dict:
        """The entry, after checking every file (size + mtime, re-hashed when they changed; `full`: always
        re-hashed); a missing, truncated or altered file is an error."""
        e = self.entry(section, key)
        if e is None:
            raise EngineError(f"{self.root}: no {section[:-1]} '{key}' in the manifest; build it first")
        for f in e["files"]:
            p = self.root / f
            if not p.is_file():
                raise EngineError(f"{p} is missing; rebuild with `wanrt export/build --force`")
            if not self._file_ok(e, f, full):
                raise EngineError(f"{p} does not match its sha256 in the manifest (truncated or corrupted); "
                                  "rebuild with --force")
        return e

    def verify(self, full: bool = True) -> list[str]:
        """Every problem of the engine dir (the manifest's integrity, every file of every entry), one line each."""
        problems = []
        try:
            self.check_integrity()
        except EngineError as e:
            problems.append(str(e))
        for section in ("graphs", "engines"):
            for key in self.data.get(section, {}):
                try:
                    self.verify_files(section, key, full)
                except EngineError as e:
                    problems.append(str(e))
        return problems


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _intact(data: dict) -> bool:
    """A manifest as wanrt wrote it (an edited one is never merged into a new save: that would re-sign the edit)."""
    return data.get("integrity") == _digest(data)


def _canon(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as on disk


def _read(path: Path) -> dict | None:
    """The manifest JSON at `path`, or None when there is none (or it cannot be read: it is then rewritten)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stat(path: Path) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]
