"""Explicit, checked key maps between the official Wan2.1 checkpoints and other layouts.

- DiT and VAE: official names <-> diffusers names (WanTransformer3DModel, AutoencoderKLWan). Our modules
  use the official names, so a diffusers checkpoint is renamed on load and written renamed by tiny.py.
- T5: official `umt5_xxl` encoder keys -> transformers `UMT5EncoderModel` keys.
- CLIP: official open-clip `visual.*` keys -> transformers `CLIPVisionModel` keys (q/k/v split).

Every map is a per-key function plus a check: the result must cover the target key set exactly, so a
checkpoint with missing or extra keys fails loudly (see loading.py) instead of loading partially.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# ---------------------------------------------------------------------------------------------------
# DiT

_DIT_RULES: list[tuple[str, str]] = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # the affine cross-attn LayerNorm
    (r"^(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"^(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"^(blocks\.\d+)\.self_attn\.norm_([qk])\.", r"\1.attn1.norm_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"^(blocks\.\d+)\.cross_attn\.norm_([qk])\.", r"\1.attn2.norm_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.k_img\.", r"\1.attn2.add_k_proj."),
    (r"^(blocks\.\d+)\.cross_attn\.v_img\.", r"\1.attn2.add_v_proj."),
    (r"^(blocks\.\d+)\.cross_attn\.norm_k_img\.", r"\1.attn2.norm_added_k."),
    (r"^patch_embedding\.", "patch_embedding."),
]


def _apply_rules(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(key)


def dit_official_to_diffusers(key: str) -> str:
    return _apply_rules(key, _DIT_RULES)


# ---------------------------------------------------------------------------------------------------
# VAE


def vae_official_to_diffusers(key: str, num_res_blocks: int = 2) -> str:
    """Official Wan2.1_VAE.pth key -> AutoencoderKLWan key (diffusers scripts/convert_wan_to_diffusers.py)."""
    parts = key.split(".")
    if key.startswith("conv1."):
        return "quant_conv." + key[len("conv1."):]
    if key.startswith("conv2."):
        return "post_quant_conv." + key[len("conv2."):]
    side = parts[0]  # encoder | decoder
    rest = parts[1:]
    if rest[0] == "conv1":
        return f"{side}.conv_in." + ".".join(rest[1:])
    if rest[0] == "head":
        sub = {"0": "norm_out", "2": "conv_out"}[rest[1]]
        return f"{side}.{sub}." + ".".join(rest[2:])
    if rest[0] == "middle":
        idx = rest[1]
        if idx == "1":
            return f"{side}.mid_block.attentions.0." + ".".join(rest[2:])
        return f"{side}.mid_block.resnets.{int(idx) // 2}." + _resnet(rest[2:])
    if side == "encoder" and rest[0] == "downsamples":
        k = rest[1]
        tail = rest[2:]
        if tail[0] in ("resample", "time_conv"):
            return f"encoder.down_blocks.{k}." + ".".join(tail)
        return f"encoder.down_blocks.{k}." + _resnet(tail)
    if side == "decoder" and rest[0] == "upsamples":
        k = int(rest[1])
        tail = rest[2:]
        per_level = num_res_blocks + 2  # (num_res_blocks + 1) resnets + one resample
        level, j = divmod(k, per_level)
        if tail[0] in ("resample", "time_conv"):
            return f"decoder.up_blocks.{level}.upsamplers.0." + ".".join(tail)
        return f"decoder.up_blocks.{level}.resnets.{j}." + _resnet(tail)
    raise KeyError(key)


def _resnet(tail: list[str]) -> str:
    name = ".".join(tail)
    table = {"residual.0.gamma": "norm1.gamma", "residual.3.gamma": "norm2.gamma"}
    if name in table:
        return table[name]
    if tail[0] == "residual":
        conv = {"2": "conv1", "6": "conv2"}[tail[1]]
        return f"{conv}." + ".".join(tail[2:])
    if tail[0] == "shortcut":
        return "conv_shortcut." + ".".join(tail[1:])
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------
# T5 (official umt5 encoder -> transformers UMT5EncoderModel)


def t5_official_to_hf(key: str) -> str:
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not m:
        raise KeyError(key)
    i, rest = m.groups()
    table = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    if rest not in table:
        raise KeyError(key)
    return f"encoder.block.{i}.{table[rest]}"


# ---------------------------------------------------------------------------------------------------
# CLIP (official open-clip visual tower -> transformers CLIPVisionModel)

# Official keys the image encoder never uses: the text tower and the contrastive head. (The last block
# is skipped by depth in clip_official_to_hf: features come from the second-to-last layer.)
CLIP_UNUSED_PREFIXES = ("textual.", "log_scale", "visual.head")


def clip_official_to_hf(sd: dict[str, torch.Tensor], num_layers_used: int) -> dict[str, torch.Tensor]:
    """Map official `visual.*` tensors to CLIPVisionModel keys for the first `num_layers_used` layers.

    Keys are written without the `vision_model.` prefix that transformers 4 used (see `strip_clip_prefix`).
    """
    out: dict[str, torch.Tensor] = {}
    p = ""
    for key, t in sd.items():
        if key.startswith(CLIP_UNUSED_PREFIXES):
            continue
        if key == "visual.patch_embedding.weight":
            out[p + "embeddings.patch_embedding.weight"] = t
        elif key == "visual.cls_embedding":
            out[p + "embeddings.class_embedding"] = t.reshape(-1)
        elif key == "visual.pos_embedding":
            out[p + "embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif key.startswith("visual.pre_norm."):
            out[p + "pre_layrnorm." + key.split(".")[-1]] = t
        elif key.startswith("visual.post_norm."):  # transformers' pooled-output norm; unused by us
            out[p + "post_layernorm." + key.split(".")[-1]] = t
        else:
            m = re.match(r"^visual\.transformer\.(\d+)\.(.+)$", key)
            if not m:
                raise KeyError(key)
            i, rest = int(m.group(1)), m.group(2)
            if i >= num_layers_used:
                continue
            lp = f"{p}encoder.layers.{i}."
            kind = rest.split(".")[-1]
            if rest.startswith("attn.to_qkv."):
                q, k, v = t.chunk(3, dim=0)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"{lp}self_attn.{name}.{kind}"] = part
            else:
                table = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
                         "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
                stem = rest.rsplit(".", 1)[0]
                if stem not in table:
                    raise KeyError(key)
                out[f"{lp}{table[stem]}.{kind}"] = t
    return out


def clip_hf_to_official(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of clip_official_to_hf for a full-depth tower (used to write tiny official checkpoints)."""
    out: dict[str, torch.Tensor] = {}
    p = ""
    out["visual.patch_embedding.weight"] = sd[p + "embeddings.patch_embedding.weight"]
    out["visual.cls_embedding"] = sd[p + "embeddings.class_embedding"].reshape(1, 1, -1)
    pos = sd[p + "embeddings.position_embedding.weight"]
    out["visual.pos_embedding"] = pos.reshape(1, *pos.shape)
    for kind in ("weight", "bias"):
        out[f"visual.pre_norm.{kind}"] = sd[f"{p}pre_layrnorm.{kind}"]
        out[f"visual.post_norm.{kind}"] = sd[f"{p}post_layernorm.{kind}"]
    for i in range(num_layers):
        lp = f"{p}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat(
                [sd[f"{lp}self_attn.{n}_proj.{kind}"] for n in "qkv"], dim=0)
            for ours, theirs in (("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"),
                                 ("norm2", "layer_norm2"), ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2")):
                out[f"visual.transformer.{i}.{ours}.{kind}"] = sd[f"{lp}{theirs}.{kind}"]
    return out


def strip_clip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4 nested CLIPVisionModel weights under `vision_model.`; 5 does not. Accept both."""
    return {k.removeprefix("vision_model."): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------
# Generic helpers


def rename(sd: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """Rename every key with `fn`; a key `fn` does not know raises KeyError naming it."""
    out = {}
    for k, v in sd.items():
        nk = fn(k)
        if nk in out:
            raise KeyError(f"two keys map to {nk!r}")
        out[nk] = v
    return out


def invert(keys: Iterable[str], fn) -> dict[str, str]:
    """{fn(key): key} over an official key set: the reverse map, checked to be one-to-one."""
    table: dict[str, str] = {}
    for k in keys:
        nk = fn(k)
        if nk in table:
            raise KeyError(f"{k!r} and {table[nk]!r} both map to {nk!r}")
        table[nk] = k
    return table
