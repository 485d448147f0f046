"""The built-in checkpoints: `tiny` (trained, shipped in the package) and `tiny-random` (written on the spot).

`tiny-random` and `write()` give random checkpoints with the real module trees and toy widths
(`WanConfig.tiny()`), in the official and the diffusers layouts, so every loader path, export and
backend can be exercised on a CPU in seconds; `cached("tiny-random")` is an official-layout copy under
the user cache, written once (atomically) and reused.

`tiny` is the small model trained on synthetic clips by scripts/train_tiny.py (see wanrt/tiny/): it
really fills in the motion between a first and a last frame. It ships under wanrt/assets/tiny in the
official layout and is checked against TRAINED_SHA256 every time it is resolved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import convert
from .checkpoint import CheckpointError
from .clip import hf_config as clip_hf_config
from .config import SampleConfig, WanConfig
from .dit import WanDiT
from .loading import OFFICIAL_CLIP, OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE
from .t5 import T5TextEncoder
from .t5 import hf_config as t5_hf_config
from .vae import WanVAE

FORMAT_VERSION = 1  # bump when the tiny checkpoint content changes, so caches are rewritten

_WORDS = (
    "a the bird flies over high sky ground red blue green disk square moves up down left right to and in of "
    "camera pans slowly small large bright dark sun tree water cat dog runs walks jumps from field city night "
    "day light shadow fast"
).split()


def cache_dir() -> Path:
    return Path(os.environ.get("WANRT_CACHE", Path.home() / ".cache" / "wanrt"))


# The trained checkpoint shipped with the package, and the sha256 of its files (tree_sha256) as written by
# scripts/train_tiny.py; a mismatch means the files were altered or are incomplete.
TRAINED_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"
TRAINED_SHA256 = "b3d67177ca8871a858c6e7e633c0c0995b993626f9022d7d9c26e02f4497871b"


# What `--ckpt_dir tiny` / `tiny-random` generate when no size or frame count is given: the trained model's
# training clips (64x64, 17 frames); the official 1280*720 x 81 would be a 3,600-token toy run for minutes.
BUILTIN_SIZE = (64, 64)
BUILTIN_FRAMES = 17

# The trained model's sampling defaults (its WanConfig.sample, so engine dirs built from it carry them too).
# It passes more held-out clips at guide scale 2 than at the official 5: at 20 steps, `python scripts/eval_tiny.py
# --targets --model_only --first_clip 40 --guide_scale G` (clips 40-59, which no reported figure uses, at the four
# sizes) gives G = 1: 70, 1.5: 68, 2: 69, 3: 67, 5: 63, 8: 61 of 80 (shift 5 or 8 instead of 16: no better; at 2,
# `--solver dpm++` or `euler` instead of UniPC: 69 too, the same clips per size), and
# clips 20-39 1: 78, 2: 77, 5: 77. 2 keeps CFG (batch 2) so that CFG-parallel runs and the default batch-2 engines
# take the default; 1.0 (CFG-free) was one clip better on both sets, within noise. Rechecked with run 32's 6-block
# DiT, clips 40-59: G = 1: 71, 2: 72, 3: 71; with run 35's DiT and run 27's decoder (shipped now): 74, 73, 73.
# Tied to these weights (sweep again when shipping others); a candidate in another folder samples at the official
# 5.0 unless given --guide_scale.
TRAINED_SAMPLE = SampleConfig(guide_scale=2.0, shift=16.0)


def sample_config(folder: str | Path) -> SampleConfig:
    """The sampling defaults of the checkpoint in `folder`: the trained tiny model's, or the official ones."""
    return TRAINED_SAMPLE if Path(folder).resolve() == TRAINED_DIR.resolve() else SampleConfig()


def is_builtin(path) -> bool:
    return str(path) in ("tiny", "tiny-random")


def cached(name: str = "tiny") -> Path:
    """Folder of the named built-in checkpoint: `tiny` the shipped trained model (verified),
    `tiny-random` the random one (written on first use)."""
    if name not in ("tiny", "tiny-random"):
        raise ValueError(f"unknown built-in checkpoint {name!r}")
    if name == "tiny":
        return trained()
    target = cache_dir() / f"tiny-random-v{FORMAT_VERSION}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
        try:
            write(tmp, layout="official", seed=0)
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race; keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def tree_sha256(folder: str | Path) -> str:
    """sha256 over every file under `folder`: its relative path and the sha256 of its bytes, in path order."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def trained(folder: str | Path = TRAINED_DIR, expected: str = TRAINED_SHA256) -> Path:
    """The shipped trained checkpoint folder, after checking its files against `expected`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"the trained tiny checkpoint is missing from {folder}: reinstall wanrt, rebuild it "
                              "with scripts/train_tiny.py, or use --ckpt_dir tiny-random")
    digest = tree_sha256(folder)
    if digest != expected:
        raise CheckpointError(f"the trained tiny checkpoint in {folder} does not match its sha256 (got "
                              f"{digest[:16]}..., expected {expected[:16]}...): its files were altered or are "
                              "incomplete. Reinstall wanrt, or rebuild it with scripts/train_tiny.py and update "
                              "TRAINED_SHA256")
    return folder


def random_models(config: WanConfig | None = None, seed: int = 0):
    """The four models of `config` (default tiny) with deterministic random weights, fp32, CPU."""
    from transformers import CLIPVisionModel

    cfg = config or WanConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    dit, vae, t5 = WanDiT(cfg.dit), WanVAE(cfg.vae), T5TextEncoder(cfg.t5)
    clip_full = CLIPVisionModel(clip_hf_config(cfg.clip, cfg.clip.num_layers))  # full depth, as checkpoints are
    for m in (dit, vae, t5, clip_full):
        _randomize(m, gen)
    return cfg, dit.eval(), vae.eval(), t5.eval(), clip_full.eval()


def write(folder: str | Path, layout: str = "official", seed: int = 0, config: WanConfig | None = None,
          dit_shards: int = 1) -> Path:
    """Write a random checkpoint of `config` (default tiny) in the official or diffusers layout."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', not {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, dit, vae, t5, clip_full = random_models(config, seed)
    tokenizer = make_tokenizer(cfg.t5.vocab_size)
    if layout == "official":
        _write_official(folder, cfg, dit, vae, t5, clip_full, tokenizer, dit_shards)
    else:
        _write_diffusers(folder, cfg, dit, vae, t5, clip_full, tokenizer, dit_shards)
    return folder


# ---------------------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Deterministic weights with healthy activations: fan-in scaled matrices, norms near 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "modulation" in name or "emb_pos" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif leaf == "gamma" or (p.ndim == 1 and leaf == "weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif leaf == "bias" or p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def make_tokenizer(vocab_size: int):
    """A small sentencepiece unigram tokenizer as a transformers T5Tokenizer (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    sentences = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(6 + i % 5)) for i in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=min(vocab_size, 96), model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    assert len(tok) <= vocab_size, (len(tok), vocab_size)
    return tok


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards <= 1:
        save_file(sd, str(folder / f"{stem}.safetensors"))
        return
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_official(folder, cfg, dit, vae, t5, clip_full, tokenizer, dit_shards):
    d = cfg.dit
    # The official config.json is incomplete (no text_dim, patch_size, ...): the loader infers those.
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "flf2v", "dim": d.dim,
        "eps": d.eps, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "in_dim": d.in_dim, "num_heads": d.num_heads,
        "num_layers": d.num_layers, "out_dim": d.out_dim, "text_len": d.text_len}, indent=2))
    _save_sharded(dit.state_dict(), folder, "diffusion_pytorch_model", dit_shards)
    torch.save(vae.state_dict(), folder / OFFICIAL_VAE)
    hf_to_official = {convert.t5_official_to_hf(k): k for k in _official_t5_keys(cfg.t5.num_layers)}
    t5_sd = {hf_to_official[k]: v for k, v in t5.model.state_dict().items() if k in hf_to_official}
    torch.save({k: v.to(torch.bfloat16) for k, v in t5_sd.items()}, folder / OFFICIAL_T5)  # official: bf16
    clip_sd = convert.clip_hf_to_official(convert.strip_clip_prefix(clip_full.state_dict()), cfg.clip.num_layers)
    clip_sd["visual.head"] = torch.zeros(cfg.clip.dim, 16)  # contrastive head, unused
    clip_sd["textual.token_embedding.weight"] = torch.zeros(8, 4)  # stand-in for the unused text tower
    clip_sd["log_scale"] = torch.zeros(())
    torch.save(clip_sd, folder / OFFICIAL_CLIP)
    tokenizer.save_pretrained(str(folder / OFFICIAL_TOKENIZER))


def _official_t5_keys(num_layers: int) -> list[str]:
    keys = ["token_embedding.weight", "norm.weight"]
    for i in range(num_layers):
        keys += [f"blocks.{i}.{n}" for n in (
            "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
            "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
            "ffn.fc2.weight")]
    return keys


def _write_diffusers(folder, cfg, dit, vae, t5, clip_full, tokenizer, dit_shards):
    d, v, c = cfg.dit, cfg.vae, cfg.clip
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.33.0",
        "image_encoder": ["transformers", "CLIPVisionModel"], "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}, indent=2))
    sub = {n: folder / n for n in ("transformer", "vae", "text_encoder", "image_encoder", "tokenizer",
                                    "image_processor", "scheduler")}
    for p in sub.values():
        p.mkdir(exist_ok=True)
    (sub["transformer"] / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0", "added_kv_proj_dim": d.dim,
        "attention_head_dim": d.head_dim, "cross_attn_norm": d.cross_attn_norm, "eps": d.eps, "ffn_dim": d.ffn_dim,
        "freq_dim": d.freq_dim, "image_dim": d.clip_dim, "in_channels": d.in_dim, "num_attention_heads": d.num_heads,
        "num_layers": d.num_layers, "out_channels": d.out_dim, "patch_size": list(d.patch_size),
        "pos_embed_seq_len": 2 * d.clip_tokens, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": d.rope_max_len,
        "text_dim": d.text_dim}, indent=2))
    _save_sharded(convert.rename(dit.state_dict(), convert.dit_official_to_diffusers), sub["transformer"],
                  "diffusion_pytorch_model", dit_shards)
    (sub["vae"] / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "attn_scales": [], "base_dim": v.dim,
        "decoder_base_dim": v.decoder_dim, "dim_mult": list(v.dim_mult), "dropout": 0.0, "latents_mean": list(v.mean),
        "latents_std": list(v.std),
        "num_res_blocks": v.num_res_blocks, "temperal_downsample": list(v.temperal_downsample),
        "z_dim": v.z_dim}, indent=2))
    vae_sd = convert.rename(vae.state_dict(), lambda k: convert.vae_official_to_diffusers(k, v.num_res_blocks))
    save_file({k: t.contiguous() for k, t in vae_sd.items()}, str(sub["vae"] / "diffusion_pytorch_model.safetensors"))
    t5_cfg = t5_hf_config(cfg.t5).to_dict()
    t5_cfg["architectures"] = ["UMT5EncoderModel"]
    (sub["text_encoder"] / "config.json").write_text(json.dumps(t5_cfg, indent=2))
    t5_sd = {k: t for k, t in t5.model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    save_file({k: t.contiguous() for k, t in t5_sd.items()}, str(sub["text_encoder"] / "model.safetensors"))
    clip_cfg = clip_hf_config(c, c.num_layers).to_dict()
    clip_cfg["architectures"] = ["CLIPVisionModel"]
    (sub["image_encoder"] / "config.json").write_text(json.dumps(clip_cfg, indent=2))
    clip_sd = {f"vision_model.{k}": t.contiguous() for k, t in convert.strip_clip_prefix(
        clip_full.state_dict()).items() if k != "embeddings.position_ids"}
    save_file(clip_sd, str(sub["image_encoder"] / "model.safetensors"))
    tokenizer.save_pretrained(str(sub["tokenizer"]))
    (sub["image_processor"] / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": c.image_size, "width": c.image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(c.mean), "image_processor_type": "CLIPImageProcessor", "image_std": list(c.std),
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": c.image_size}}, indent=2))
    (sub["scheduler"] / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0", "flow_shift": 16.0,
        "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
        "solver_order": 2, "solver_type": "bh2", "lower_order_final": True, "final_sigmas_type": "zero",
        "predict_x0": True}, indent=2))
