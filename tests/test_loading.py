"""`wanrt.models.load`: both layouts, config inference, precision, and loud failures."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanrt.models import loading
from wanrt.models.checkpoint import CheckpointError
from wanrt.models.config import WanConfig


def _same_config(a: WanConfig, b: WanConfig) -> bool:
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


@pytest.fixture(scope="module")
def both(tiny_official, tiny_diffusers):
    return loading.load(tiny_official), loading.load(tiny_diffusers)


def test_layouts_infer_the_config(both):
    off, dif = both
    assert _same_config(off.config, WanConfig.tiny())  # inferred from shapes + the incomplete config.json
    assert _same_config(dif.config, WanConfig.tiny())  # read from the diffusers config.json files
    assert off.layout == "official" and dif.layout == "diffusers"


def test_layouts_load_the_same_weights(both):
    off, dif = both
    for name in ("dit", "vae", "image_encoder"):
        a, b = getattr(off, name).state_dict(), getattr(dif, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the official T5 file is bf16 (as the real one); the diffusers copy is fp32
    a, b = off.text_encoder.state_dict(), dif.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k].bfloat16().float()) for k in a)


def test_tiny_word_resolves_to_cached_official_folder():
    folder, layout = loading.resolve("tiny")
    assert layout == "official" and (folder / loading.OFFICIAL_VAE).is_file()
    models = loading.load("tiny", components=("vae",))
    assert models.dit is None and models.vae is not None


def test_bf16_precision_map(tiny_official):
    m = loading.load(tiny_official, dtype=torch.bfloat16)
    sd = m.dit.state_dict()
    assert sd["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert sd["time_projection.1.weight"].dtype == torch.float32 and sd["head.head.weight"].dtype == torch.float32
    assert m.dit.rope_cos.dtype == torch.float32 and m.dit.time_table.dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 for t in m.text_encoder.state_dict().values())
    assert all(t.dtype == torch.float16 for t in m.image_encoder.model.state_dict().values())
    assert all(t.dtype == torch.float32 for t in m.vae.state_dict().values())


def test_meta_build_of_14b_is_instant():
    m = loading.build(WanConfig.flf2v_14b(), device="meta")
    n = sum(p.numel() for p in m.dit.parameters())
    assert 16.0e9 < n < 16.8e9 and next(m.dit.parameters()).is_meta


# ------------------------------------------------------------------------------------- loud failures


@pytest.fixture
def official_copy(tiny_official, tmp_path):
    return shutil.copytree(tiny_official, tmp_path / "ckpt")


@pytest.fixture
def diffusers_copy(tiny_diffusers, tmp_path):
    return shutil.copytree(tiny_diffusers, tmp_path / "ckpt")


def test_missing_shard(diffusers_copy):
    (diffusers_copy / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard.*missing.*00002-of-00002"):
        loading.load(diffusers_copy, components=("dit",))


def test_wrong_key(official_copy):
    path = official_copy / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["blocks.0.self_attn.q_proj.weight"] = sd.pop("blocks.0.self_attn.q.weight")
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \['blocks.0.self_attn.q.weight'\]") as e:
        loading.load(official_copy, components=("dit",))
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "missing key(s) ['blocks.0.self_attn.q.weight']" in msg and "q_proj" in msg


def test_shape_mismatch(official_copy):
    path = official_copy / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["blocks.1.ffn.2.bias"] = torch.zeros(7)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"'blocks.1.ffn.2.bias' has shape \(7,\), the model expects \(64,\)"):
        loading.load(official_copy, components=("dit",))


@pytest.mark.parametrize("name,component", [(loading.OFFICIAL_VAE, "vae"),
                                             ("diffusion_pytorch_model.safetensors", "dit")])
def test_truncated_files(official_copy, name, component):
    path = official_copy / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{name}"):
        loading.load(official_copy, components=(component,))


def test_wrong_dtype(official_copy):
    path = official_copy / loading.OFFICIAL_VAE
    sd = torch.load(path, weights_only=True)
    sd["conv1.bias"] = sd["conv1.bias"].to(torch.int64)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="'conv1.bias' has dtype torch.int64"):
        loading.load(official_copy, components=("vae",))


class _Payload:
    """Anything that is not a tensor: weights_only=True must refuse to unpickle it."""


def test_pickled_objects_are_refused(official_copy):
    torch.save({"conv1.weight": _Payload()}, official_copy / loading.OFFICIAL_VAE)
    with pytest.raises(CheckpointError, match="cannot read .*Wan2.1_VAE.pth"):
        loading.load(official_copy, components=("vae",))


def test_missing_component_file(official_copy):
    (official_copy / loading.OFFICIAL_T5).unlink()
    with pytest.raises(CheckpointError, match="missing models_t5_umt5-xxl-enc-bf16.pth"):
        loading.load(official_copy)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither an official"):
        loading.load(tmp_path)


def test_other_model_type_is_refused(official_copy):
    import json

    cfg = json.loads((official_copy / "config.json").read_text())
    cfg["model_type"] = "i2v"
    (official_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'i2v'"):
        loading.load(official_copy, components=("dit",))


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_a_wider_decoder_is_read_from_either_layout(tmp_path, layout):
    """VAEConfig.decoder_dim: from the decoder's shapes (official .pth) or `decoder_base_dim` (diffusers)."""
    from wanrt.models import tiny

    base = WanConfig.tiny()
    cfg = base.replace(vae=dataclasses.replace(base.vae, decoder_dim=12))
    folder = tiny.write(tmp_path / layout, layout, config=cfg)
    models = loading.load(folder)
    assert models.config.vae.decoder_dim == 12 and models.config.vae.dim == base.vae.dim
    assert models.vae.decoder.conv1.weight.shape[0] == 12 * base.vae.dim_mult[-1]
    assert _same_config(models.config, cfg)
