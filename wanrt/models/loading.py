"""`load(path)`: the four models from an official checkpoint folder, a diffusers folder, or `tiny`.

Configs are read where the folder has them and inferred from tensor shapes where it does not (the
official folder has a config only for the DiT, and an incomplete one). Models are built on the meta
device and filled tensor by tensor (see checkpoint.load_module), so a 14B load holds one copy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import convert
from .checkpoint import CheckpointError, Weights, find_weights, load_module, open_weights, read_json
from .clip import CLIPImageEncoder
from .config import CLIPConfig, DiTConfig, T5Config, VAEConfig, WanConfig
from .dit import WanDiT, precision_map
from .t5 import T5TextEncoder
from .vae import WanVAE

COMPONENTS = ("dit", "vae", "text_encoder", "image_encoder")

# Official checkpoint folder (Wan-AI/Wan2.1-FLF2V-14B-720P).
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"
OFFICIAL_DIT_STEM = "diffusion_pytorch_model"
CLIP_HEAD_DIM = 80  # ViT-H/14: 1280 / 16 heads; the official checkpoint carries no config


@dataclass
class WanModels:
    config: WanConfig
    dit: WanDiT | None = None
    vae: WanVAE | None = None
    text_encoder: T5TextEncoder | None = None
    image_encoder: CLIPImageEncoder | None = None
    source: str = ""
    layout: str = ""
    lora: list[dict] = field(default_factory=list)  # merged LoRAs: [{file, sha256, scale}, ...] (lora.identities)

    def fingerprint(self) -> str:
        """A short hash of where the weights came from (paths, sizes, mtimes): cheap, stable per checkout."""
        return checkpoint_fingerprint(self.source) if self.source else ""


def resolve(path: str | Path) -> tuple[Path, str]:
    """-> (folder, layout) with layout 'official' or 'diffusers'. `tiny` resolves to the cached tiny model."""
    if str(path) in ("tiny", "tiny-random"):
        from . import tiny

        return tiny.cached(str(path)), "official"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist (or use --ckpt_dir tiny)")
    if (folder / "model_index.json").is_file():
        return folder, "diffusers"
    official = [OFFICIAL_VAE, OFFICIAL_T5, OFFICIAL_CLIP]
    if any((folder / f).exists() for f in official):
        missing = [f for f in official + [OFFICIAL_TOKENIZER] if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"checkpoint folder {folder} is missing {', '.join(missing)}")
        return folder, "official"
    raise CheckpointError(f"{folder} is neither an official Wan2.1 checkpoint folder ({', '.join(official)}, "
                          "DiT safetensors) nor a diffusers folder (model_index.json)")


class Checkpoint:
    """An opened checkpoint folder: its layout, inferred config, and lazy per-component weight views whose
    keys are our modules' state_dict keys (DiT/VAE: official names; T5/CLIP: transformers names)."""

    def __init__(self, path: str | Path):
        self.folder, self.layout = resolve(path)
        self._src = _Official(self.folder) if self.layout == "official" else _Diffusers(self.folder)
        src = self._src
        from .tiny import sample_config

        self.config = WanConfig(dit=src.dit_config(), vae=src.vae_config(), t5=src.t5_config(),
                                clip=src.clip_config(), name=self.folder.name, sample=sample_config(self.folder))

    def weights(self, component: str) -> Weights | dict[str, torch.Tensor]:
        if component == "dit":
            return self._src.dit_weights()
        if component == "vae":
            return self._src.vae_weights()
        if component == "text_encoder":
            return self._src.t5_weights()
        if component == "image_encoder":
            return self._src.clip_weights(self.config.clip.num_layers - 1)
        raise ValueError(f"unknown component {component!r}; choose from {COMPONENTS}")

    def tokenizer(self):
        return self._src.tokenizer()

    def fingerprint(self) -> str:
        return checkpoint_fingerprint(self.folder)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         components: Iterable[str] = COMPONENTS, precision: str | None = None, fp8_keep: int = 0,
         lora: Iterable | None = None, fuse: bool = False) -> WanModels:
    """Load the models. dtype None: everything fp32. dtype bf16/fp16: the official precision map
    (DiT matmuls in dtype with fp32 islands, T5 in dtype, CLIP in fp16, VAE fp32).
    precision 'fp8': that map (dtype bf16 unless given), then the DiT block linears quantised once to
    e4m3 (wanrt.kernels.fp8.quantize_blocks), all but the first and last `fp8_keep` blocks.

    lora: [(file, scale), ...] merged into the DiT in fp32 as its weights are read, before any cast or
    FP8 quantisation (see models/lora.py); every LoRA is checked against the model before a weight is loaded.

    fuse: the DiT's q/k/v, and the cross-attention's k/v pairs, as one GEMM each (wanrt.kernels.fusion), after
    the LoRA merge and FP8 quantisation, so both still see the official names; the output is unchanged."""
    components = tuple(components)
    if precision not in (None, "fp8"):
        raise ValueError(f"precision must be None (dtype decides) or 'fp8', got {precision!r}")
    if precision == "fp8" and dtype is None:
        dtype = torch.bfloat16
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if precision == "fp8" and not 0 <= fp8_keep <= cfg.dit.num_layers // 2:  # before the expensive load
        raise ValueError(f"fp8_keep={fp8_keep}: keeps the first and last N of the {cfg.dit.num_layers} DiT blocks "
                         f"in bf16, so 0 <= N <= {cfg.dit.num_layers // 2}")
    models = WanModels(config=cfg, source=str(ckpt.folder), layout=ckpt.layout)
    low = dtype if dtype in (torch.bfloat16, torch.float16) else None
    with torch.device("meta"):
        if "dit" in components:
            models.dit = WanDiT(cfg.dit)
        if "vae" in components:
            models.vae = WanVAE(cfg.vae)
        if "text_encoder" in components:
            models.text_encoder = T5TextEncoder(cfg.t5)
        if "image_encoder" in components:
            models.image_encoder = CLIPImageEncoder(cfg.clip)
    dit_weights = None
    if lora:
        from .lora import LoRAError, plan_for

        if models.dit is None:
            raise LoRAError("LoRAs apply to the DiT; load it (components include 'dit') to merge them")
        plan = plan_for(lora, models.dit)
        dit_weights = plan.patched(ckpt.weights("dit"))
        models.lora = [s.identity() for s in plan.specs]
    if models.dit is not None:
        dtypes = precision_map(models.dit, low) if low else torch.float32
        load_module(models.dit, ckpt.weights("dit") if dit_weights is None else dit_weights, dtypes, device)
        models.dit.reset_buffers()
        if precision == "fp8":
            from wanrt.kernels.fp8 import quantize_blocks

            quantize_blocks(models.dit.blocks, keep=fp8_keep)
        if fuse:
            from wanrt.kernels.fusion import fuse_projections

            fuse_projections(models.dit)
    if models.vae is not None:
        load_module(models.vae, ckpt.weights("vae"), torch.float32, device)
        models.vae.reset_buffers()
    if models.text_encoder is not None:
        load_module(models.text_encoder.model, ckpt.weights("text_encoder"), low or torch.float32, device)
        models.text_encoder.tokenizer = ckpt.tokenizer()
    if models.image_encoder is not None:
        clip_dtype = torch.float16 if low else torch.float32
        load_module(models.image_encoder.model, ckpt.weights("image_encoder"), clip_dtype, device)
        models.image_encoder.reset_buffers()
    for m in (models.dit, models.vae, models.text_encoder, models.image_encoder):
        if m is not None:
            left = [n for n, t in (*m.named_parameters(), *m.named_buffers()) if t.is_meta]
            if left:  # a derived buffer nobody recomputed would be silent garbage
                raise RuntimeError(f"{type(m).__name__}: tensors still on the meta device after loading: {left[:5]}")
            m.eval().requires_grad_(False)
    return models


def build(config: WanConfig, device: str | torch.device = "meta", components: Iterable[str] = COMPONENTS
          ) -> WanModels:
    """The models of a config with uninitialised (meta) or default-initialised weights, no checkpoint."""
    models = WanModels(config=config, source="", layout="")
    with torch.device(device):
        for name in components:
            cls = {"dit": lambda: WanDiT(config.dit), "vae": lambda: WanVAE(config.vae),
                   "text_encoder": lambda: T5TextEncoder(config.t5),
                   "image_encoder": lambda: CLIPImageEncoder(config.clip)}[name]
            setattr(models, name, cls().eval().requires_grad_(False))
    return models


def nonfinite_weights(path: str | Path, components: Iterable[str] = COMPONENTS) -> tuple[int, list[str]]:
    """Read every tensor of a checkpoint once (one at a time; the 14B checkpoint reads its ~33 GB) and
    return (tensors checked, '<component>: <key>' of each holding NaN or inf). A NaN weight otherwise
    runs to the end of a request and gives a black video."""
    ckpt = Checkpoint(path)
    checked, bad = 0, []
    for component in components:
        w = ckpt.weights(component)
        names = w.names() if isinstance(w, Weights) else list(w)
        for key in names:
            t = w.read(key) if isinstance(w, Weights) else w[key]
            checked += 1
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{component}: {key}")
    return checked, bad


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over (relative path, size, mtime) of every file in the folder: changes when weights change."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Official layout


class _Official:
    def __init__(self, folder: Path):
        self.folder = folder
        self._dit: Weights | None = None

    def dit_weights(self) -> Weights:
        if self._dit is None:
            self._dit = open_weights(find_weights(self.folder, [OFFICIAL_DIT_STEM]))
        return self._dit

    def vae_weights(self) -> Weights:
        return open_weights(self.folder / OFFICIAL_VAE)

    def t5_weights(self) -> Weights:
        return open_weights(self.folder / OFFICIAL_T5).renamed(convert.t5_official_to_hf)

    def clip_weights(self, num_layers_used: int) -> dict[str, torch.Tensor]:
        w = open_weights(self.folder / OFFICIAL_CLIP).subset(lambda k: k.startswith("visual."))
        return convert.clip_official_to_hf({k: w.read(k) for k in w.names()}, num_layers_used)

    def tokenizer(self):
        return _tokenizer(self.folder / OFFICIAL_TOKENIZER)

    def dit_config(self) -> DiTConfig:
        w = self.dit_weights()
        cfg_path = self.folder / "config.json"
        raw = read_json(cfg_path) if cfg_path.is_file() else {}
        if raw.get("model_type", "flf2v") != "flf2v":
            raise CheckpointError(f"{cfg_path}: model_type {raw['model_type']!r}; wanrt runs FLF2V checkpoints "
                                  "(model_type 'flf2v')")
        return _dit_config_from_shapes(w, raw)

    def vae_config(self) -> VAEConfig:
        return _vae_config_from_shapes(open_weights(self.folder / OFFICIAL_VAE))

    def t5_config(self) -> T5Config:
        w = open_weights(self.folder / OFFICIAL_T5)
        vocab, dim = w.shape("token_embedding.weight")
        buckets, heads = w.shape("blocks.0.pos_embedding.embedding.weight")
        return T5Config(vocab_size=vocab, dim=dim, dim_attn=w.shape("blocks.0.attn.q.weight")[0],
                        dim_ffn=w.shape("blocks.0.ffn.fc1.weight")[0], num_heads=heads,
                        num_layers=w.count("blocks."), num_buckets=buckets)

    def clip_config(self) -> CLIPConfig:
        w = open_weights(self.folder / OFFICIAL_CLIP)
        dim, _, patch, _ = w.shape("visual.patch_embedding.weight")
        tokens = w.shape("visual.pos_embedding")[1]
        grid = math.isqrt(tokens - 1)
        return CLIPConfig(image_size=grid * patch, patch_size=patch, dim=dim,
                          mlp_dim=w.shape("visual.transformer.0.mlp.0.weight")[0],
                          num_heads=dim // CLIP_HEAD_DIM, num_layers=w.count("visual.transformer."))


def _dit_config_from_shapes(w: Weights, raw: dict) -> DiTConfig:
    """Shapes decide every width; the config supplies what shapes cannot (heads, eps, text_len)."""
    dim, in_dim, *patch = w.shape("patch_embedding.weight")
    dim_head = raw.get("num_heads")
    if dim_head is None:
        dim_head = dim // 128  # official head_dim
    return DiTConfig(
        patch_size=tuple(patch), text_len=raw.get("text_len", 512), in_dim=in_dim, dim=dim,
        ffn_dim=w.shape("blocks.0.ffn.0.weight")[0], freq_dim=w.shape("time_embedding.0.weight")[1],
        text_dim=w.shape("text_embedding.0.weight")[1], out_dim=w.shape("head.head.weight")[0] // math.prod(patch),
        num_heads=dim_head, num_layers=w.count("blocks."), eps=raw.get("eps", 1e-6),
        clip_dim=w.shape("img_emb.proj.1.weight")[1], clip_tokens=w.shape("img_emb.emb_pos")[1] // 2,
    )


def _vae_config_from_shapes(w: Weights) -> VAEConfig:
    dim = w.shape("encoder.conv1.weight")[0]
    z_dim = w.shape("conv2.weight")[0]
    n_enc, n_dec = w.count("encoder.downsamples."), w.count("decoder.upsamples.")
    levels = n_dec - n_enc  # decoder has one more residual block per level
    nrb = (n_enc - (levels - 1)) // levels
    mult, tdown = [], []
    for level in range(levels):
        first = level * (nrb + 1)
        mult.append(w.shape(f"encoder.downsamples.{first}.residual.2.weight")[0] // dim)
        if level < levels - 1:
            tdown.append(f"encoder.downsamples.{first + nrb}.time_conv.weight" in w)
    dec_dim = w.shape("decoder.conv1.weight")[0] // mult[-1]  # = dim unless the decoder is wider
    return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(mult), num_res_blocks=nrb,
                     temperal_downsample=tuple(tdown), decoder_dim=None if dec_dim == dim else dec_dim)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} is missing")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# diffusers layout (Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers)


class _Diffusers:
    def __init__(self, folder: Path):
        self.folder = folder
        index = read_json(folder / "model_index.json")
        for sub in ("transformer", "vae", "text_encoder", "image_encoder", "tokenizer"):
            if sub not in index or not (folder / sub).is_dir():
                raise CheckpointError(f"diffusers folder {folder} has no '{sub}' component")
        self._dit: Weights | None = None

    def _cfg(self, sub: str) -> dict:
        return read_json(self.folder / sub / "config.json")

    def dit_weights(self) -> Weights:
        if self._dit is None:
            w = open_weights(find_weights(self.folder / "transformer", [OFFICIAL_DIT_STEM]))
            # diffusers names -> official names, the inverse of convert.dit_official_to_diffusers over
            # the key set this config implies.
            with torch.device("meta"):
                ref = WanDiT(self.dit_config()).state_dict()
            table = convert.invert(ref, convert.dit_official_to_diffusers)
            self._dit = w.renamed(lambda k: table[k])
        return self._dit

    def vae_weights(self) -> Weights:
        w = open_weights(find_weights(self.folder / "vae", ["diffusion_pytorch_model"]))
        cfg = self.vae_config()
        with torch.device("meta"):
            ref = WanVAE(cfg).state_dict()
        table = convert.invert(ref, lambda k: convert.vae_official_to_diffusers(k, cfg.num_res_blocks))
        return w.renamed(lambda k: table[k])

    def t5_weights(self) -> Weights:
        w = open_weights(find_weights(self.folder / "text_encoder", ["model"]))
        return w.subset(lambda k: not k.startswith(("decoder.", "lm_head.")))

    def clip_weights(self, num_layers_used: int) -> Weights:
        w = open_weights(find_weights(self.folder / "image_encoder", ["model"]))
        w = w.renamed(lambda k: k.removeprefix("vision_model."))

        def used(k: str) -> bool:
            if k.startswith(("visual_projection.", "text_model.", "logit_scale")):
                return False
            if k.startswith("encoder.layers."):
                return int(k.split(".")[2]) < num_layers_used
            return k != "embeddings.position_ids"

        return w.subset(used)

    def tokenizer(self):
        return _tokenizer(self.folder / "tokenizer")

    def dit_config(self) -> DiTConfig:
        c = self._cfg("transformer")
        if c.get("image_dim") is None or c.get("pos_embed_seq_len") is None:
            raise CheckpointError(f"{self.folder / 'transformer' / 'config.json'} is not an FLF2V transformer "
                                  "(needs image_dim and pos_embed_seq_len)")
        return DiTConfig(
            patch_size=tuple(c.get("patch_size", (1, 2, 2))), in_dim=c["in_channels"],
            dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
            freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), out_dim=c["out_channels"],
            num_heads=c["num_attention_heads"], num_layers=c["num_layers"], eps=c.get("eps", 1e-6),
            cross_attn_norm=c.get("cross_attn_norm", True), clip_dim=c["image_dim"],
            clip_tokens=c["pos_embed_seq_len"] // 2, rope_max_len=c.get("rope_max_seq_len", 1024),
        )

    def vae_config(self) -> VAEConfig:
        c = self._cfg("vae")
        defaults = VAEConfig()
        dec_dim = c.get("decoder_base_dim")
        return VAEConfig(dim=c.get("base_dim", 96), z_dim=c.get("z_dim", 16),
                         dim_mult=tuple(c.get("dim_mult", defaults.dim_mult)),
                         num_res_blocks=c.get("num_res_blocks", 2),
                         temperal_downsample=tuple(c.get("temperal_downsample", defaults.temperal_downsample)),
                         mean=tuple(c.get("latents_mean") or defaults.mean),
                         std=tuple(c.get("latents_std") or defaults.std),
                         decoder_dim=None if dec_dim == c.get("base_dim", 96) else dec_dim)

    def t5_config(self) -> T5Config:
        c = self._cfg("text_encoder")
        return T5Config(vocab_size=c["vocab_size"], dim=c["d_model"], dim_attn=c["d_kv"] * c["num_heads"],
                        dim_ffn=c["d_ff"], num_heads=c["num_heads"], num_layers=c["num_layers"],
                        num_buckets=c.get("relative_attention_num_buckets", 32),
                        max_distance=c.get("relative_attention_max_distance", 128),
                        eps=c.get("layer_norm_epsilon", 1e-6))

    def clip_config(self) -> CLIPConfig:
        c = self._cfg("image_encoder")
        c = c.get("vision_config", c)
        return CLIPConfig(image_size=c["image_size"], patch_size=c["patch_size"], dim=c["hidden_size"],
                          mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
                          num_layers=c["num_hidden_layers"], eps=c.get("layer_norm_eps", 1e-5))

