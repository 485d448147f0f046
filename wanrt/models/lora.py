"""LoRA files for the DiT: read, recognise the key format, check against the model, merge at load.

A LoRA adds a low-rank update to chosen weights: W' = W + scale * (alpha / rank) * up @ down, with
down (rank, in) and up (out, rank) (for a conv weight, down (rank, *W.shape[1:]) and up (out, rank, 1...)).
Two key formats are read (one per file, detected, never guessed):

- official / ComfyUI (what most shared Wan2.1 LoRAs use): official module names with an optional
  `diffusion_model.` prefix, e.g. `diffusion_model.blocks.0.self_attn.q.lora_down.weight`, `.lora_up.weight`
  (or `.lora_A.weight` / `.lora_B.weight`), `.alpha`; full deltas `.diff` (W' = W + scale * diff) and
  `.diff_b` (bias' = bias + scale * diff_b);
- diffusers / PEFT: diffusers module names with an optional `transformer.` prefix, e.g.
  `transformer.blocks.0.attn1.to_q.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias` (added like diff_b);
  alpha from an `.alpha` key or the file's PEFT metadata (`lora_alpha` / `r`), else alpha = rank.
  Names are mapped with the DiT's one key map, convert.dit_official_to_diffusers.

The merge happens in fp32 on the checkpoint tensor as it is read (before any bf16 cast or FP8
quantisation), one weight at a time, so a 14B load still holds one copy of the model. Every problem
(an unknown key or format, a module the model lacks, a shape that does not fit) is a LoRAError naming
the file and the key, raised before any weight is touched: a LoRA is applied completely or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import convert
from .checkpoint import CheckpointError, Weights, open_weights

# suffix -> role; longest first so `.lora_B.bias` wins over a shorter match
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.weight", "up"), (".lora_B.bias", "bias"), (".alpha", "alpha"), (".diff_b", "bias"),
    (".diff", "diff"),
)
_PREFIXES = {"diffusion_model.": "official", "transformer.": "diffusers"}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights writes the LoraConfig


class LoRAError(CheckpointError):
    """A LoRA file cannot be read, is of an unknown format, or does not fit the model."""


@dataclass(frozen=True)
class LoRASpec:
    """One LoRA to merge: its file and strength. `identity()` is what manifests record."""

    path: Path
    scale: float = 1.0

    def identity(self) -> dict:
        return {"file": self.path.name, "sha256": file_sha256(self.path), "scale": float(self.scale)}


@dataclass
class _Module:
    """The LoRA entries of one target module (official name, e.g. `blocks.0.self_attn.q`)."""

    parts: dict[str, str] = field(default_factory=dict)  # role -> key in the file


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def parse(spec: str) -> LoRASpec:
    """'FILE' or 'FILE:SCALE' (the CLI form) -> LoRASpec; a missing file or a bad scale is a LoRAError."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec  # a ':' inside the path, no scale
    return as_spec((path, scale))


def as_spec(item) -> LoRASpec:
    """(file, scale), a LoRASpec, or a bare file (scale 1) -> a checked LoRASpec."""
    if isinstance(item, LoRASpec):
        spec = item
    elif isinstance(item, (str, Path)):
        spec = LoRASpec(Path(item), 1.0)
    else:
        try:
            path, scale = item
        except (TypeError, ValueError):
            raise LoRAError(f"a LoRA is given as (file, scale), got {item!r}") from None
        spec = LoRASpec(Path(path), float(scale))
    if not math.isfinite(spec.scale):
        raise LoRAError(f"LoRA scale for {spec.path} must be finite, got {spec.scale}")
    if not spec.path.is_file():
        raise LoRAError(f"LoRA file {spec.path} does not exist")
    return spec


def as_specs(loras: Iterable | None) -> list[LoRASpec]:
    return [as_spec(x) for x in (loras or [])]


def identities(loras: Iterable | None) -> list[dict]:
    """What an engine manifest records: [{file, sha256, scale}, ...] in merge order."""
    return [s.identity() for s in as_specs(loras)]


# ---------------------------------------------------------------------------------------------------


def _read_metadata_alpha(path: Path) -> float | None:
    """PEFT's lora_alpha from a diffusers safetensors file's metadata (None when there is none)."""
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LoRAError(f"{path}: unreadable {PEFT_METADATA_KEY} metadata") from None
    if isinstance(meta, dict) and any(k.startswith("transformer.") for k in meta):  # a pipeline's save_lora_weights
        meta = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    if not isinstance(meta, dict):
        raise LoRAError(f"{path}: {PEFT_METADATA_KEY} metadata is not a LoraConfig dict")
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise LoRAError(f"{path}: per-module rank_pattern/alpha_pattern in the PEFT metadata is not supported; "
                        "merge the LoRA into plain lora_A/lora_B keys first")
    alpha, r = meta.get("lora_alpha"), meta.get("r")
    if alpha is None:
        return None
    return float(alpha) / float(r) if r else None  # alpha per unit rank: scaling = lora_alpha / r


def _split(key: str) -> tuple[str, str]:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise KeyError(key)


def _format(path: Path, keys: Sequence[str], official_modules: set[str], diffusers_modules: set[str]) -> str:
    """'official' or 'diffusers' for the whole file, from prefixes, else from the module vocabulary."""
    if not keys:
        raise LoRAError(f"{path} holds no tensors")
    bad = []
    for k in keys:
        try:
            _split(k)
        except KeyError:
            bad.append(k)
    if bad:
        raise LoRAError(f"{path}: unknown LoRA key format ({bad[0]!r}; {len(bad)} such key(s)); wanrt reads official/"
                        "ComfyUI keys (diffusion_model.<module>.lora_down/lora_up/alpha/diff/diff_b) and diffusers/"
                        "PEFT keys (transformer.<module>.lora_A/lora_B)")
    prefixes = {next((p for p in _PREFIXES if k.startswith(p)), "") for k in keys}
    if len(prefixes) > 1:
        raise LoRAError(f"{path}: mixes key prefixes {sorted(p or '(none)' for p in prefixes)}; one LoRA file "
                        "must use one format")
    prefix = prefixes.pop()
    if prefix:
        return _PREFIXES[prefix]
    modules = {_split(k)[0] for k in keys}
    only_official = modules - diffusers_modules
    only_diffusers = modules - official_modules
    if not only_official - official_modules and only_official:
        return "official"
    if not only_diffusers - diffusers_modules and only_diffusers:
        return "diffusers"
    if not only_official and not only_diffusers:  # names shared by both layouts (e.g. patch_embedding)
        return "official"
    unknown = sorted(modules - official_modules - diffusers_modules)
    raise LoRAError(f"{path}: cannot tell the key format (module {unknown[0] if unknown else sorted(modules)[0]!r} "
                    "is neither an official nor a diffusers DiT module name); add the diffusion_model. or "
                    "transformer. prefix the format uses")


class LoRAPlan:
    """Checked LoRA updates for a DiT, keyed by official parameter name; `patched(weights)` applies them."""

    def __init__(self, loras: Iterable, shapes: Mapping[str, tuple[int, ...]]):
        """loras: [(file, scale), ...]; shapes: the model's official state_dict key -> shape."""
        self.specs = as_specs(loras)
        self.shapes = dict(shapes)
        official_modules = {k.rsplit(".", 1)[0] for k in self.shapes if "." in k}
        to_official = convert.invert(self.shapes, convert.dit_official_to_diffusers)  # diffusers key -> official
        diffusers_modules = {k.rsplit(".", 1)[0] for k in to_official if "." in k}
        # official param -> [(kind, scale, tensors...)], tensors kept as the file stores them (small)
        self.updates: dict[str, list[tuple]] = {}
        for spec in self.specs:
            self._add(spec, official_modules, diffusers_modules, to_official)

    def _add(self, spec: LoRASpec, official_modules, diffusers_modules, to_official) -> None:
        path = spec.path
        try:
            w: Weights = open_weights(path)
        except CheckpointError as e:
            raise LoRAError(f"cannot read LoRA {path}: {e}") from None
        keys = w.names()
        fmt = _format(path, keys, official_modules, diffusers_modules)
        meta_alpha = _read_metadata_alpha(path) if fmt == "diffusers" else None
        groups: dict[str, _Module] = {}
        for k in keys:
            stem, role = _split(k)
            stem = stem.removeprefix("diffusion_model." if fmt == "official" else "transformer.")
            g = groups.setdefault(stem, _Module())
            if role in g.parts:
                raise LoRAError(f"{path}: {k!r} and {g.parts[role]!r} both give the {role} of {stem!r}")
            g.parts[role] = k
        pending: list[tuple[str, tuple]] = []
        for stem, g in groups.items():
            def target(leaf: str, key: str, stem=stem) -> str:
                name = f"{stem}.{leaf}"
                if fmt == "diffusers":
                    name = to_official.get(name, "")
                if name not in self.shapes:
                    raise LoRAError(f"{path}: {key!r} targets {stem}.{leaf}, which this model does not have "
                                    "(a LoRA for another model or model size?)")
                return name

            parts = g.parts
            if ("down" in parts) != ("up" in parts):
                have = parts.get("down") or parts.get("up")
                raise LoRAError(f"{path}: {have!r} has no matching {'up' if 'down' in parts else 'down'} matrix")
            if "alpha" in parts and "down" not in parts:
                raise LoRAError(f"{path}: {parts['alpha']!r} has no lora_down/lora_up pair")
            ratio = 1.0  # alpha / rank of the low-rank pair (PEFT scales lora_B's bias by it too)
            if "down" in parts:
                name = target("weight", parts["down"])
                down, up = w.read(parts["down"]).float(), w.read(parts["up"]).float()
                shape = self.shapes[name]
                rank = down.shape[0] if down.ndim else 0
                if (down.ndim < 2 or up.ndim < 2 or tuple(down.shape[1:]) != tuple(shape[1:]) or up.shape[0] != shape[0]
                        or up.shape[1] != rank or any(s != 1 for s in up.shape[2:])):
                    raise LoRAError(f"{path}: {parts['down']!r} {tuple(down.shape)} / {parts['up']!r} "
                                    f"{tuple(up.shape)} do not fit {name} {tuple(shape)}")
                if "alpha" in parts:
                    alpha = w.read(parts["alpha"]).float()
                    if alpha.numel() != 1:
                        raise LoRAError(f"{path}: {parts['alpha']!r} must be a scalar, has shape {tuple(alpha.shape)}")
                    ratio = alpha.item() / rank
                elif meta_alpha is not None:
                    ratio = meta_alpha
                else:
                    ratio = 1.0
                pending.append((name, ("lowrank", spec.scale * ratio, up, down)))
            if "diff" in parts:
                name = target("weight", parts["diff"])
                self._check_full(path, parts["diff"], w, name)
                pending.append((name, ("full", spec.scale, w, parts["diff"])))
            if "bias" in parts:
                name = target("bias", parts["bias"])
                self._check_full(path, parts["bias"], w, name)
                bias_ratio = ratio if parts["bias"].endswith(".lora_B.bias") else 1.0  # diff_b: a plain delta
                pending.append((name, ("full", spec.scale * bias_ratio, w, parts["bias"])))
        for name, update in pending:  # only after every key of the file passed its checks
            self.updates.setdefault(name, []).append(update)

    def _check_full(self, path: Path, key: str, w: Weights, name: str) -> None:
        if tuple(w.shape(key)) != tuple(self.shapes[name]):
            raise LoRAError(f"{path}: {key!r} has shape {tuple(w.shape(key))}, {name} has {tuple(self.shapes[name])}")

    def delta(self, name: str) -> torch.Tensor | None:
        """The fp32 update of one official parameter (None when no LoRA touches it)."""
        ups = self.updates.get(name)
        if not ups:
            return None
        shape = self.shapes[name]
        total = torch.zeros(shape, dtype=torch.float32)
        for kind, scale, *rest in ups:
            if kind == "lowrank":
                up, down = rest
                total += scale * (up.flatten(1) @ down.flatten(1)).reshape(shape)
            else:
                w, key = rest
                total += scale * w.read(key).float()
        return total

    def patched(self, weights: Weights) -> Weights:
        """`weights` with every LoRA-touched tensor read as fp32 W + delta (merged before any cast)."""
        def merge(name: str, t: torch.Tensor) -> torch.Tensor:
            d = self.delta(name)
            return t if d is None else t.float() + d

        return weights.mapped(merge, names=set(self.updates))


def plan_for(loras: Iterable | None, model: torch.nn.Module) -> LoRAPlan | None:
    """The checked LoRAPlan for `model` (meta is fine: only shapes are used); None for no LoRA."""
    specs = as_specs(loras)
    if not specs:
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return LoRAPlan(specs, shapes)


def merge_state_dict(sd: dict[str, torch.Tensor], loras: Iterable) -> dict[str, torch.Tensor]:
    """A new official DiT state_dict with the LoRAs merged (fp32 math, result in each tensor's dtype)."""
    plan = LoRAPlan(loras, {k: tuple(v.shape) for k, v in sd.items()})
    out = dict(sd)
    for name in plan.updates:
        out[name] = (sd[name].float() + plan.delta(name)).to(sd[name].dtype)
    return out

