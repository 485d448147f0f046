"""Reading weight files safely, lazily and loudly.

safetensors (single file or shards + `*.index.json`) and `.pth`/`.bin` (torch.load with
`weights_only=True` and mmap) are opened as a lazy `Weights` view: names and shapes come from the
headers, a tensor is read only when it is loaded, cast to its final dtype and device at once, so a
14B load never holds two copies of the model. Every failure is a `CheckpointError` that names the
file and the keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint file or folder is missing, unreadable or does not match the model."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    file: Path
    read: Callable[[], torch.Tensor]


class Weights:
    """A read-only, lazy name -> tensor view over one or more weight files."""

    def __init__(self, entries: dict[str, _Entry], source: str):
        self._entries = entries
        self.source = source

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def file(self, key: str) -> Path:
        return self._entries[key].file

    def read(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        try:
            return entry.read()
        except Exception as e:  # noqa: BLE001 - any failure while reading bytes means a bad file
            raise CheckpointError(f"cannot read tensor {key!r} from {entry.file}: {e}") from None

    def renamed(self, fn: Callable[[str], str]) -> Weights:
        """View with every key renamed by `fn` (a KeyError from fn names an unknown checkpoint key)."""
        out: dict[str, _Entry] = {}
        for k, e in self._entries.items():
            try:
                nk = fn(k)
            except KeyError:
                raise CheckpointError(f"{e.file}: unexpected key {k!r} for this model") from None
            if nk in out:
                raise CheckpointError(f"{e.file}: keys map twice onto {nk!r}")
            out[nk] = e
        return Weights(out, self.source)

    def mapped(self, fn: Callable[[str, torch.Tensor], torch.Tensor], names: set[str]) -> Weights:
        """View whose tensors in `names` are read as fn(name, tensor) (e.g. a LoRA merged on read)."""
        out = dict(self._entries)
        for k in names:
            e = self._entries[k]
            out[k] = _Entry(e.shape, e.file, lambda k=k, e=e: fn(k, e.read()))
        return Weights(out, self.source)

    def subset(self, keep: Callable[[str], bool]) -> Weights:
        return Weights({k: e for k, e in self._entries.items() if keep(k)}, self.source)

    def count(self, prefix: str, depth: int = 1) -> int:
        """Number of distinct integer indices at `prefix<i>.` (e.g. layers in `blocks.`)."""
        idx = {k[len(prefix):].split(".")[0] for k in self._entries if k.startswith(prefix)}
        return len({i for i in idx if i.isdigit()})


def open_weights(path: Path) -> Weights:
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = read_json(path)
        if "weight_map" not in index:
            raise CheckpointError(f"{path} has no 'weight_map'")
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (path.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint shard(s) missing: {', '.join(missing)} (listed in {path}); "
                                  "download every shard of the checkpoint")
        entries: dict[str, _Entry] = {}
        for shard in shards:
            part = open_weights(path.parent / shard)
            expected = {k for k, v in index["weight_map"].items() if v == shard}
            if set(part.names()) != expected:
                lost = sorted(expected - set(part.names()))[:5]
                extra = sorted(set(part.names()) - expected)[:5]
                raise CheckpointError(f"shard {path.parent / shard} does not match {path.name}: "
                                      f"missing {lost}, unexpected {extra}")
            entries.update(part._entries)
        return Weights(entries, str(path))
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its download or copy was cut off; fetch the file again")
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; all mean "unreadable"
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e} "
                              "(truncated, corrupted, or not a plain tensor state_dict?)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors")
    return Weights({k: _Entry(tuple(v.shape), path, lambda v=v: v) for k, v in obj.items()}, str(path))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _open_safetensors(path: Path) -> Weights:
    """safetensors read with plain file reads, one tensor at a time (no mmap: a memory-mapped 50 GB
    checkpoint would show up in the process's RSS as it is read). The header is checked against the
    file size, so a truncated file fails here, naming itself."""
    import json

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupted file?)") from None
    header.pop("__metadata__", None)
    base = 8 + n
    entries = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        if base + end > size:
            raise CheckpointError(f"cannot read {path}: tensor {key!r} ends past the end of the file "
                                  "(truncated or corrupted file?)")
        shape = tuple(info["shape"])

        def read(start=start, end=end, dtype=dtype, shape=shape):
            t = torch.empty(shape, dtype=dtype)
            buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
            with open(path, "rb") as f:
                f.seek(base + start)
                if f.readinto(buf) != end - start:
                    raise OSError("short read")
            return t

        entries[key] = _Entry(shape, path, read)
    return Weights(entries, str(path))


def find_weights(folder: Path, stems: Iterable[str]) -> Path:
    """The first of `stem.safetensors`, its sharded index, `stem.bin`, `stem.pth` that exists."""
    tried = []
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.pth"):
            if (folder / name).is_file():
                return folder / name
            tried.append(name)
    raise CheckpointError(f"no weights in {folder} (looked for {', '.join(tried)})")


def tied_names(module: torch.nn.Module) -> dict[str, list[str]]:
    """name -> all state_dict names of the same (tied) tensor, e.g. T5's shared / encoder.embed_tokens."""
    groups: dict[int, list[str]] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(v), []).append(k)
    return {k: names for names in groups.values() for k in names}


def load_module(module: torch.nn.Module, weights: Weights | dict[str, torch.Tensor],
                dtypes: dict[str, torch.dtype] | torch.dtype, device: torch.device | str = "cpu",
                source: str | None = None) -> torch.nn.Module:
    """Fill a meta-device module from `weights`: exact key set and shapes checked first, then each
    tensor is read, cast and moved once, and assigned (no second copy of the model)."""
    if isinstance(weights, dict):
        weights = Weights({k: _Entry(tuple(v.shape), Path(source or "<memory>"), lambda v=v: v)
                           for k, v in weights.items()}, source or "<memory>")
    source = source or weights.source
    expected = module.state_dict(keep_vars=True)
    # Tied parameters (e.g. T5's shared / embed_tokens) appear under several names; a checkpoint may
    # store any one of them. Read one, assign it to all.
    alias = {}
    for n, names in tied_names(module).items():
        present = [m for m in names if m in weights]
        if n not in weights and present:
            alias[n] = present[0]
    missing = sorted(set(expected) - set(weights.names()) - set(alias))
    unexpected = sorted(set(weights.names()) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:6]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:6]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    for k, ref in expected.items():
        if k in alias:
            continue
        if weights.shape(k) != tuple(ref.shape):
            raise CheckpointError(f"{weights.file(k)}: tensor {k!r} has shape {weights.shape(k)}, "
                                  f"the model expects {tuple(ref.shape)}")
    if isinstance(dtypes, torch.dtype):
        dtypes = dict.fromkeys(expected, dtypes)
    sd = {}
    for k in expected:
        if k in alias:
            continue
        t = weights.read(k)
        if not t.is_floating_point():
            raise CheckpointError(f"{weights.file(k)}: tensor {k!r} has dtype {t.dtype}, "
                                  "expected a floating-point weight")
        sd[k] = t.to(device=device, dtype=dtypes[k])
    for k, src in alias.items():
        sd[k] = sd[src]
    module.load_state_dict(sd, strict=True, assign=True)
    return module
