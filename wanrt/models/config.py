"""Model configurations: one small frozen dataclass per component, and presets.

`WanConfig.flf2v_14b()` is the official Wan2.1 FLF2V-14B (see ../shared/spec/wan21-flf2v.md);
`WanConfig.tiny()` is the same architecture with toy dimensions, used by tests and the demo;
`WanConfig.small()` is a mid-size random config for CPU/GPU benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Official latent normalisation constants (wan/modules/vae.py, WanVAE).
VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# OpenAI CLIP normalisation (used by the official open-clip image tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The official FLF2V negative prompt: "镜头切换，" + i2v's "镜头晃动，" + the shared one.
FLF2V_NEG_PROMPT = (
    "镜头切换，镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class DiTConfig:
    """WanModel(model_type='flf2v') hyper-parameters."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512  # T5 tokens; context is zero-padded to this length
    in_dim: int = 36  # 16 noise + 4 mask + 16 conditioning latent
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    clip_dim: int = 1280  # image-encoder width fed to img_emb
    clip_tokens: int = 257  # tokens per frame; FLF2V uses 2 frames -> 514
    rope_max_len: int = 1024  # positions per axis in the RoPE table
    num_train_timesteps: int = 1000

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex frequencies per axis (t, h, w): 22/21/21 for head_dim 128."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)


@dataclass(frozen=True)
class VAEConfig:
    """Causal 3D VAE (WanVAE_) hyper-parameters."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling
    mean: tuple[float, ...] = VAE_MEAN
    std: tuple[float, ...] = VAE_STD
    # the decoder's base width when it differs from the encoder's (diffusers' `decoder_base_dim`, Wan2.2's VAE
    # has one; Wan2.1's is symmetric: None = `dim`). The latents depend on the encoder alone, so a decoder can
    # be widened without touching the latent space a DiT was trained in.
    decoder_dim: int | None = None

    @property
    def decoder_base_dim(self) -> int:
        return self.decoder_dim or self.dim

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class T5Config:
    """UMT5 encoder hyper-parameters (official `umt5_xxl(encoder_only=True)`)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6


@dataclass(frozen=True)
class CLIPConfig:
    """Vision tower of open-clip xlm-roberta-large ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int | None = None  # the MLP's hidden width (ViT-H/14: 5120); None: 4 * dim. Read from the
    # checkpoint, any value (diffusers' intermediate_size need not be a multiple of hidden_size)
    num_heads: int = 16
    num_layers: int = 32  # the checkpoint's depth; features come from layer num_layers - 1
    eps: float = 1e-5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.dim)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache step-caching parameters of one model (see wanrt/runtime/cache.py for the rule).

    indicator: which timestep embedding the change is measured on: "e" (B, dim), the embedding the head is
    modulated with, or "e0" (B, 6, dim), the projection every block's modulation adds. coefficients: the
    rescaling polynomial, highest power first (numpy.polyval order), fitted from indicator change to
    output change. first_steps / last_steps: always computed. threshold: the documented default.
    """

    coefficients: tuple[float, ...]
    indicator: str = "e"
    first_steps: int = 1
    last_steps: int = 1
    threshold: float = 0.2
    source: str = ""


# TeaCache coefficients per DiT architecture (dim, num_layers, ffn_dim).
TEACACHE: dict[tuple[int, int, int], TeaCacheConfig] = {
    # Wan2.1 14B 720p image-to-video (FLF2V-14B-720P is fine-tuned from it and shares its time embedding
    # layers' shapes): the published I2V-720P coefficients of the TeaCache authors, non-"ret_steps"
    # variant (indicator e, step 0 and the last step always computed). Source: github.com/ali-vilab/TeaCache,
    # TeaCache4Wan2.1/teacache_generate.py (commit 7c10efc), `'720P' in args.ckpt_dir` branch; their README
    # runs it at thresholds 0.2 (~1.9x) and 0.3 (~2.5x) on I2V-14B-720P.
    (5120, 40, 13824): TeaCacheConfig(
        coefficients=(-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
        indicator="e", first_steps=1, last_steps=1, threshold=0.2,
        source="ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py, i2v 720P"),
    # BEGIN tiny teacache (written by scripts/fit_teacache.py; do not edit by hand)
    # tiny: 4 training clips x [20, 30, 50] steps, 388 pairs, degree 4, rms residual 0.0010
    (128, 6, 384): TeaCacheConfig(
        coefficients=(3.59286856e+01, -1.46114594e+01, 1.96526290e+00, 1.05498820e-01, 2.35490567e-04),
        indicator="e", first_steps=1, last_steps=1, threshold=0.02,
        source="scripts/fit_teacache.py"),
    # END tiny teacache
}


def teacache_config(dit: DiTConfig) -> TeaCacheConfig | None:
    """The TeaCache parameters fitted for this DiT architecture, or None (no fit exists)."""
    return TEACACHE.get((dit.dim, dit.num_layers, dit.ffn_dim))


@dataclass(frozen=True)
class SampleConfig:
    """The sampling defaults a checkpoint is meant for, used where a request gives none (the official
    wan/configs' sample_guide_scale and sample_shift: 5.0 and 16 for FLF2V-14B at 720p; the trained tiny
    model: models/tiny.py)."""

    guide_scale: float = 5.0
    shift: float = 16.0


@dataclass(frozen=True)
class WanConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    name: str = "flf2v-14b"
    sample: SampleConfig = field(default_factory=SampleConfig)

    @classmethod
    def flf2v_14b(cls) -> WanConfig:
        return cls()

    @classmethod
    def tiny(cls) -> WanConfig:
        """Toy dimensions, same module tree. 4 heads so 2- and 4-way head splits work."""
        t5 = T5Config(vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
        clip = CLIPConfig(image_size=32, patch_size=8, dim=160, num_heads=2, num_layers=3)
        dit = DiTConfig(dim=64, ffn_dim=128, freq_dim=64, text_dim=t5.dim, num_heads=4, num_layers=2,
                        clip_dim=clip.dim, clip_tokens=clip.num_tokens)
        vae = VAEConfig(dim=8)
        return cls(dit=dit, vae=vae, t5=t5, clip=clip, name="tiny")

    @classmethod
    def small(cls) -> WanConfig:
        """A mid-size random config (~0.1B DiT) for benchmarks on CPU and quick GPU checks."""
        t5 = T5Config(vocab_size=256, dim=256, dim_attn=256, dim_ffn=512, num_heads=4, num_layers=2)
        clip = CLIPConfig(image_size=112, patch_size=14, dim=320, num_heads=4, num_layers=3)
        dit = DiTConfig(dim=512, ffn_dim=1536, freq_dim=256, text_dim=t5.dim, num_heads=8, num_layers=8,
                        clip_dim=clip.dim, clip_tokens=clip.num_tokens)
        vae = VAEConfig(dim=32)
        return cls(dit=dit, vae=vae, t5=t5, clip=clip, name="small")

    @classmethod
    def preset(cls, name: str) -> WanConfig:
        presets = {"flf2v-14b": cls.flf2v_14b, "tiny": cls.tiny, "small": cls.small}
        key = name.lower().replace("_", "-")
        if key not in presets:
            raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(presets)}")
        return presets[key]()

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Inverse of to_dict (as stored in an engine manifest); tuples restored from JSON lists."""
        def build(kind, values):
            fields = {f.name: f for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})

        return cls(dit=build(DiTConfig, d["dit"]), vae=build(VAEConfig, d["vae"]), t5=build(T5Config, d["t5"]),
                   clip=build(CLIPConfig, d["clip"]), name=d.get("name", ""),
                   sample=build(SampleConfig, d.get("sample", {})))  # manifests before it: the official values
