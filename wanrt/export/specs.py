"""One I/O spec per component: names, dtypes and static shapes for a (resolution, frame_num, batch).

The ONNX export writes graphs with exactly these inputs/outputs, the engine builders make their
profiles from them, the runtimes allocate their buffers from them and the manifest records them.
Nothing else restates these shapes.

Boundary dtypes are fp32 (int64 for token ids, masks and timesteps) whatever the internal precision:
a bf16 or fp8 graph casts inside, so every backend exchanges the same tensors with the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wanrt.models.config import WanConfig


@dataclass(frozen=True)
class Component:
    """A runtime component: the name users see, the graphs it is exported/built as, its checkpoint weights."""

    name: str
    graphs: tuple[str, ...]
    weights: str  # the checkpoint view (wanrt.models.loading) its graphs' initializers come from


# THE component table: every flag (--components, --override), manifest entry and bench row uses these names.
# Graph names (t5, clip, vae_*) are internal: one component may be several graphs (the VAE's chunk graphs:
# the first chunk without caches in, and the steady state, for the encoder and the decoder).
TABLE = {c.name: c for c in (
    Component("text_encoder", ("t5",), "text_encoder"),
    Component("image_encoder", ("clip",), "image_encoder"),
    Component("dit", ("dit",), "dit"),
    Component("vae", ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"), "vae"),
)}
COMPONENTS = tuple(TABLE)
GRAPHS = {name: c.graphs for name, c in TABLE.items()}
GRAPH_NAMES = tuple(g for c in TABLE.values() for g in c.graphs)
# spellings of earlier versions (export/build took graph names): refused with the new name
OLD_NAMES = {"t5": "text_encoder", "clip": "image_encoder", "vae_encoder": "vae", "vae_decoder": "vae"}


def component_of(graph: str) -> str:
    """The component a graph belongs to."""
    for c in TABLE.values():
        if graph in c.graphs:
            return c.name
    raise ValueError(f"unknown graph {graph!r}; graphs: {', '.join(GRAPH_NAMES)}")


def check_components(names) -> list[str]:
    """`names` (an iterable or a comma-separated string) as a list of component names, duplicates removed;
    ValueError with one line for an unknown name, naming the new spelling of an old one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    for n in names:
        if n in OLD_NAMES:
            raise ValueError(f"component {n!r} is now called {OLD_NAMES[n]!r} (components: {', '.join(COMPONENTS)})")
        if n not in TABLE:
            raise ValueError(f"unknown component {n!r}; choose from {', '.join(COMPONENTS)}")
    return names


PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        def ts(x):
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]))

        return cls(d["name"], tuple(ts(x) for x in d["inputs"]), tuple(ts(x) for x in d["outputs"]))


@dataclass(frozen=True)
class Target:
    """What an engine is built for: output video size, frame count and the DiT batch (2 = CFG)."""

    width: int
    height: int
    frame_num: int
    batch: int = 2

    def __post_init__(self):
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"engine size {self.width}x{self.height}: both sides must be positive multiples of 16")
        if self.frame_num < 5 or (self.frame_num - 1) % 4:
            raise ValueError(f"frame_num must be 4n+1 and at least 5, got {self.frame_num}")
        if self.batch not in (1, 2):
            raise ValueError(f"DiT batch must be 1 or 2 (CFG), got {self.batch}")

    @property
    def tag(self) -> str:
        return f"{self.width}x{self.height}x{self.frame_num}"

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frame_num - 1) // 4 + 1, self.height // 8, self.width // 8


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' (or 'WxH') -> (W, H), both positive multiples of 16; ValueError naming the problem otherwise."""
    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise ValueError(f"--size must look like W*H (e.g. 1280*720), got {size!r}") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValueError(f"--size {size}: width and height must be positive multiples of 16 (e.g. 1280*720)")
    return w, h


def graph_specs(cfg: WanConfig, target: Target) -> dict[str, GraphSpec]:
    """Every graph's I/O for this config and target, keyed by graph name."""
    import torch

    from wanrt.models.vae import WanVAE

    f32, i64 = "float32", "int64"
    t_lat, h, w = target.latent
    b = target.batch
    d = cfg.dit
    specs = {
        "t5": GraphSpec("t5", (TensorSpec("ids", i64, (1, cfg.t5.text_len)),
                               TensorSpec("mask", i64, (1, cfg.t5.text_len))),
                        (TensorSpec("context", f32, (1, cfg.t5.text_len, cfg.t5.dim)),)),
        "clip": GraphSpec("clip", (TensorSpec("pixels", f32, (2, 3, cfg.clip.image_size, cfg.clip.image_size)),),
                          (TensorSpec("clip_tokens", f32, (2, cfg.clip.num_tokens, cfg.clip.dim)),)),
        "dit": GraphSpec("dit", (
            TensorSpec("x", f32, (b, d.out_dim, t_lat, h, w)), TensorSpec("t", i64, (b,)),
            TensorSpec("context", f32, (b, d.text_len, d.text_dim)),
            TensorSpec("clip_fea", f32, (b, 2 * d.clip_tokens, d.clip_dim)),
            TensorSpec("y", f32, (b, d.in_dim - d.out_dim, t_lat, h, w))),
            (TensorSpec("velocity", f32, (b, d.out_dim, t_lat, h, w)),)),
    }
    with torch.device("meta"):
        vae = WanVAE(cfg.vae)
    enc_caches = vae.encoder_cache_shapes(1, target.height, target.width)
    dec_caches = vae.decoder_cache_shapes(1, target.height, target.width)
    z = cfg.vae.z_dim

    def caches(prefix, shapes):
        return tuple(TensorSpec(f"{prefix}_{i}", f32, tuple(s)) for i, s in enumerate(shapes))

    latent = TensorSpec("latent", f32, (1, z, 1, h, w))
    specs["vae_encoder_first"] = GraphSpec(
        "vae_encoder_first", (TensorSpec("video", f32, (1, 3, 1, target.height, target.width)),),
        (latent, *caches("cache_out", enc_caches)))
    specs["vae_encoder"] = GraphSpec(
        "vae_encoder", (TensorSpec("video", f32, (1, 3, 4, target.height, target.width)),
                        *caches("cache_in", enc_caches)),
        (latent, *caches("cache_out", enc_caches)))
    specs["vae_decoder_first"] = GraphSpec(
        "vae_decoder_first", (latent,),
        (TensorSpec("frames", f32, (1, 3, 1, target.height, target.width)), *caches("cache_out", dec_caches)))
    specs["vae_decoder"] = GraphSpec(
        "vae_decoder", (latent, *caches("cache_in", dec_caches)),
        (TensorSpec("frames", f32, (1, 3, 4, target.height, target.width)), *caches("cache_out", dec_caches)))
    return specs


def resolution_dependent(graph: str) -> bool:
    return graph not in ("t5", "clip")
