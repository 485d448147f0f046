"""The Wan2.1 causal 3D VAE (official WanVAE_ / WanVAE), as fixed-shape functional chunk steps.

Module names are the official ones, so `Wan2.1_VAE.pth` loads with `strict=True`. The model is only
defined through its chunked path, because the temporal down/upsampling exists only there (see
../shared/spec/wan21-flf2v.md section 5):

- encode: chunk 0 = frame 0, chunk i = frames 1+4(i-1) .. 4i; each chunk yields one latent frame.
- decode: one latent frame per chunk; chunk 0 yields 1 frame, every later chunk 4.

The official code keeps a `feat_cache` list of variable-size tensors and string markers ('Rep') in
module state. Here every cache slot is a tensor whose shape is the same for every chunk after the
first, and the chunk functions take the caches as input and return the new ones, so the steady-state
chunk is one static graph (for ONNX export / compilation) and `encode`/`decode` are plain loops over it:

- temporal-kernel-3 causal conv: cache = the last 2 frames of the layer's input, zeros before the
  first chunk. Official pads 2 zeros in front and later keeps a 1- or 2-frame cache; a 1-frame cache
  [f0] padded by one zero is exactly the 2-frame cache [0, f0], so the zero-initialised 2-frame cache
  reproduces it for every chunk.
- downsample3d time_conv (stride 2): chunk 0 passes its single frame through; later chunks convolve
  [last frame of the previous chunk, x]. Cache = last frame of the spatially downsampled x.
- upsample3d time_conv: chunk 0 does no temporal upsampling and the official 'Rep' marker makes the
  next chunk convolve with plain zero padding, i.e. a zero cache. Cache = last 2 frames of the input.

All math is fp32, as in the official wrapper (autocast to float).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _triple

from wanrt.kernels.attention import attention

from .config import VAEConfig

Shape = tuple[int, ...]


class _CacheIO:
    """Reads the previous chunk's caches in layer execution order and collects the new ones.

    `prev=None` is the first chunk: every read returns None. The order is fixed by the module tree
    (the same order the official `feat_idx` counter walks), so it is the order of the export I/O spec.
    """

    def __init__(self, prev: list[torch.Tensor] | None):
        self.prev = prev
        self.pos = 0
        self.new: list[torch.Tensor] = []

    def read(self) -> torch.Tensor | None:
        if self.prev is None:
            return None
        if self.pos >= len(self.prev):
            raise ValueError(f"too few caches: the model needs more than {len(self.prev)}")
        t = self.prev[self.pos]
        self.pos += 1
        return t

    def write(self, t: torch.Tensor) -> None:
        self.new.append(t)

    def finish(self) -> list[torch.Tensor]:
        if self.prev is not None and self.pos != len(self.prev):
            raise ValueError(f"got {len(self.prev)} caches, the model uses {self.pos}")
        return self.new


# ---------------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time. The temporal padding is not in the conv: the caller supplies past frames.

    The official layer pads `2 * padding_t` zero frames at the front (none at the back). Here the
    conv itself only pads spatially, and `step` prepends the cached past frames (zeros for the first
    chunk) instead, which is the same computation with a fixed-size cache.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        pt, ph, pw = _triple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.context = 2 * pt  # past frames consumed per call

    def step(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, T, H, W), cache (B, C, context, H, W) or None -> (y, new cache of the same shape)."""
        if self.context == 0:  # 1x1x1 and the strided downsample time_conv: plain forward / caller's cat
            raise TypeError("step() is for temporally padded causal convs; call the conv directly")
        if cache is None:
            b, c, _, h, w = x.shape
            cache = x.new_zeros(b, c, self.context, h, w)
        padded = torch.cat([cache, x], dim=2)  # (B, C, context + T, H, W)
        return super().forward(padded), padded[:, :, -self.context:]

    def cache_shape(self, b: int, h: int, w: int) -> Shape:
        return (b, self.in_channels, self.context, h, w)


class RMS_norm(nn.Module):  # noqa: N801  (official class name)
    """L2-normalise over channels, times sqrt(dim) * gamma (official RMS_norm; its bias is the constant 0)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        # gamma broadcasts over (H, W) for per-frame 4D inputs, over (T, H, W) for 5D ones
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """2x nearest upsampling of (N, C, H, W).

    The official layer uses mode='nearest-exact'; for an integer scale of 2 the source index
    floor((i + 0.5) / 2) equals nearest's floor(i / 2), so both are identical. 'nearest' exports to
    ONNX cleanly (the legacy exporter has no `_upsample_nearest_exact2d`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame: (B, C, T, H, W) -> (B*T, C, H, W) -> fn -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),  # official Dropout(0.0): a no-op; kept so the second conv is index 6
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        norm1, act1, conv1, norm2, act2, _, conv2 = self.residual
        h = self.shortcut(x)  # 1x1x1: needs no past frames
        x, cache = conv1.step(act1(norm1(x)), io.read())
        io.write(cache)
        x, cache = conv2.step(act2(norm2(x)), io.read())
        io.write(cache)
        return x + h

    def cache_shapes(self, b: int, h: int, w: int) -> list[Shape]:
        return [self.residual[2].cache_shape(b, h, w), self.residual[6].cache_shape(b, h, w)]


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, io: _CacheIO | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape

        def attend(f: torch.Tensor) -> torch.Tensor:  # f (B*T, C, H, W)
            # (B*T, H*W, 3C), made contiguous like the official code so q/k/v are row-major views
            qkv = self.to_qkv(self.norm(f)).flatten(2).transpose(1, 2).contiguous()
            q, k, v = (u.unsqueeze(2) for u in qkv.chunk(3, dim=-1))  # each (B*T, H*W, 1, C)
            o = attention(q, k, v).squeeze(2)  # (B*T, H*W, C)
            return self.proj(o.transpose(1, 2).reshape(b * t, c, h, w))

        return x + _per_frame(attend, x)

    def cache_shapes(self, b: int, h: int, w: int) -> list[Shape]:
        return []


class Resample(nn.Module):
    """Spatial 2x down/upsampling per frame, plus 2x temporal down/upsampling for the '3d' modes."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.dim = dim
        self.mode = mode
        if mode.startswith("up"):
            # halves the channels: the next level's first ResidualBlock takes dim // 2
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad right/bottom only, so a stride-2 3x3 conv maps H to H/2 with the official alignment
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            # one output frame of 2*dim channels per input frame, interleaved into two frames below
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, io)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, io)
        return x

    def _time_up(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        b, c, t, h, w = x.shape
        prev = io.read()
        if prev is None:
            # first chunk: no temporal upsampling (1 frame stays 1 frame); the official 'Rep' marker
            # makes the next chunk zero-pad, which is what a zero cache does
            io.write(x.new_zeros(self.time_conv.cache_shape(b, h, w)))
            return x
        y, cache = self.time_conv.step(x, prev)  # (B, 2C, T, H, W)
        io.write(cache)
        # channels [0:C] -> even output frames, [C:2C] -> odd ones (official reshape + stack)
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _time_down(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        prev = io.read()
        io.write(x[:, :, -1:])  # (B, C, 1, H, W): the frame in front of the next chunk
        if prev is None:
            return x  # first chunk: its single frame passes through
        # stride 2, no padding: [prev, x_1..x_T] (T even) -> T/2 frames
        return self.time_conv(torch.cat([prev, x], dim=2))

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (h * 2, w * 2) if self.mode.startswith("up") else (h // 2, w // 2)

    def cache_shapes(self, b: int, h: int, w: int) -> list[Shape]:
        if self.mode == "upsample3d":
            return [self.time_conv.cache_shape(b, h, w)]
        if self.mode == "downsample3d":
            return [(b, self.dim, 1, h // 2, w // 2)]
        return []


def _run(layers, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
    for layer in layers:
        x = layer(x, io)
    return x


def _head(head: nn.Sequential, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
    norm, act, conv = head
    x, cache = conv.step(act(norm(x)), io.read())
    io.write(cache)
    return x


def _walk_shapes(conv_in: CausalConv3d, layers, conv_out: CausalConv3d,
                 b: int, h: int, w: int) -> list[Shape]:
    """Steady-state cache shapes in execution order; (h, w) is the input's spatial size."""
    shapes = [conv_in.cache_shape(b, h, w)]
    for layer in layers:
        shapes += layer.cache_shapes(b, h, w)
        if isinstance(layer, Resample):
            h, w = layer.out_size(h, w)
    return shapes + [conv_out.cache_shape(b, h, w)]


# ---------------------------------------------------------------------------------------------------
# Encoder / decoder


class Encoder3d(nn.Module):
    """(B, 3, T, H, W) chunk -> (B, 2*z_dim, 1, H/8, W/8): mu and log_var, before WanVAE.conv1."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]  # official: [96, 96, 192, 384, 384]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        x, cache = self.conv1.step(x, io.read())
        io.write(cache)
        x = _run(self.downsamples, x, io)
        x = _run(self.middle, x, io)
        return _head(self.head, x, io)

    def cache_shapes(self, b: int, h: int, w: int) -> list[Shape]:
        return _walk_shapes(self.conv1, [*self.downsamples, *self.middle], self.head[2], b, h, w)


class Decoder3d(nn.Module):
    """(B, z_dim, 1, h, w) latent frame -> (B, 3, 1 or 4, 8h, 8w), unclamped."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * u for u in (mult[-1], *mult[::-1])]  # official: [384, 384, 384, 192, 96]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != last:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, io: _CacheIO) -> torch.Tensor:
        x, cache = self.conv1.step(x, io.read())
        io.write(cache)
        x = _run(self.middle, x, io)
        x = _run(self.upsamples, x, io)
        return _head(self.head, x, io)

    def cache_shapes(self, b: int, h: int, w: int) -> list[Shape]:
        return _walk_shapes(self.conv1, [*self.middle, *self.upsamples], self.head[2], b, h, w)


# ---------------------------------------------------------------------------------------------------
# The model


class WanVAE(nn.Module):
    """Video <-> normalised latent. `encode`/`decode` are loops over the functional chunk steps."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # applied to the raw latent before decoding
        self.decoder = Decoder3d(cfg)
        # latent normalisation constants: config values, not checkpoint tensors
        self.register_buffer("mean", torch.empty(0), persistent=False)
        self.register_buffer("std", torch.empty(0), persistent=False)
        self.reset_buffers()  # on the meta device too: derived tables get their shapes

    def derived_buffers(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Latent mean/std: config values, not checkpoint tensors."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        return {"mean": torch.tensor(self.cfg.mean, dtype=torch.float32, device=device).view(shape),
                "std": torch.tensor(self.cfg.std, dtype=torch.float32, device=device).view(shape)}

    def reset_buffers(self) -> None:
        """(Re)create the latent mean/std on the weights' device. Called after a meta-device load."""
        for name, value in self.derived_buffers(self.conv1.weight.device).items():
            setattr(self, name, value)

    # -- whole videos ----------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1], T = 4n+1 -> normalised mu (B, z_dim, 1+(T-1)/4, H/8, W/8)."""
        self._check_video(video)
        return encode_chunks(self.encode_chunk, video, self.cfg.temporal_stride)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z (B, z_dim, T, h, w) -> video (B, 3, 1+4(T-1), 8h, 8w) clamped to [-1, 1]."""
        self._check_latent(z)
        return decode_chunks(self.decode_chunk, z)

    # -- fixed-shape chunk steps (the export unit) -----------------------------------------------------

    def encode_chunk(
        self, x: torch.Tensor, caches: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, 3, 1 or 4, H, W) -> (normalised mu (B, z_dim, 1, H/8, W/8), new caches).

        caches=None is the first chunk (1 frame); later chunks have temporal_stride (4) frames and the
        caches returned by the previous call, shaped as `encoder_cache_shapes` says.
        """
        self._check_spatial(x, "encode_chunk")
        want_t = 1 if caches is None else self.cfg.temporal_stride
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[2] != want_t:
            raise ValueError(f"encode_chunk expects (B, 3, {want_t}, H, W) "
                             f"({'first' if caches is None else 'later'} chunk), got {tuple(x.shape)}")
        io = _CacheIO(caches)
        h = self.encoder(x, io)  # (B, 2*z_dim, 1, H/8, W/8)
        mu = self.conv1(h)[:, :self.cfg.z_dim]  # log_var (the other half) is discarded: encode = mean
        # official arithmetic, (mu - mean) * (1 / std), so results match its pipeline bit for bit
        return (mu - self.mean) * (1.0 / self.std), io.finish()

    def decode_chunk(
        self, z: torch.Tensor, caches: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised z (B, z_dim, 1, h, w) -> (frames (B, 3, 1 or 4, 8h, 8w) in [-1, 1], new caches).

        caches=None is the first latent frame (yields 1 video frame); later ones yield 4.
        """
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] != 1:
            raise ValueError(f"decode_chunk expects (B, {self.cfg.z_dim}, 1, h, w), got {tuple(z.shape)}")
        io = _CacheIO(caches)
        # official un-normalisation z / (1 / std) + mean (not z * std: the decoder amplifies the
        # last-bit difference to ~1e-5); conv2 is 1x1x1, so per chunk equals the official whole-sequence conv2
        x = self.conv2(z / (1.0 / self.std) + self.mean)
        frames = self.decoder(x, io)
        return frames.clamp(-1.0, 1.0), io.finish()

    def encoder_cache_shapes(self, batch: int, height: int, width: int) -> list[Shape]:
        """Shapes of the caches `encode_chunk` takes and returns after the first chunk (video H, W)."""
        self._check_hw(height, width)
        return self.encoder.cache_shapes(batch, height, width)

    def decoder_cache_shapes(self, batch: int, height: int, width: int) -> list[Shape]:
        """Shapes of the caches `decode_chunk` takes and returns after the first chunk.

        height and width are the VIDEO's (pixels), as for `encoder_cache_shapes`; the latent is /8.
        """
        self._check_hw(height, width)
        s = self.cfg.spatial_stride
        return self.decoder.cache_shapes(batch, height // s, width // s)

    # -- input checks ----------------------------------------------------------------------------------

    def _check_hw(self, height: int, width: int) -> None:
        s = self.cfg.spatial_stride
        if height % s or width % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {height}x{width}")

    def _check_spatial(self, x: torch.Tensor, what: str) -> None:
        if x.dim() != 5:
            raise ValueError(f"{what} expects a 5D (B, C, T, H, W) tensor, got shape {tuple(x.shape)}")
        self._check_hw(x.shape[3], x.shape[4])

    def _check_video(self, video: torch.Tensor) -> None:
        self._check_spatial(video, "encode")
        if video.shape[1] != 3:
            raise ValueError(f"encode expects 3 channels (B, 3, T, H, W), got shape {tuple(video.shape)}")
        t, step = video.shape[2], self.cfg.temporal_stride
        if (t - 1) % step:
            raise ValueError(f"encode needs T = {step}n+1 frames (1, {1 + step}, {1 + 2 * step}, ...), "
                             f"got T={t}")

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"decode expects (B, {self.cfg.z_dim}, T, h, w) with T >= 1, "
                             f"got {tuple(z.shape)}")


# -- the chunk loops, shared by every backend (eager, ONNX Runtime, AOTInductor, TensorRT) ----------------


def encode_chunks(encode_chunk, video: torch.Tensor, temporal_stride: int = 4) -> torch.Tensor:
    """Official encode chunking: chunk 0 is frame 0 alone, chunk i is frames 1+4(i-1) .. 4i.

    encode_chunk(x, caches | None) -> (mu (B, z, 1, h, w), caches). Returns (B, z, 1+(T-1)/4, h, w).
    """
    t = video.shape[2]
    if (t - 1) % temporal_stride:
        raise ValueError(f"encode needs T = {temporal_stride}n+1 frames, got T={t}")
    caches = None
    out = []
    for i in range(1 + (t - 1) // temporal_stride):
        chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + temporal_stride * (i - 1):1 + temporal_stride * i]
        mu, caches = encode_chunk(chunk.contiguous(), caches)
        out.append(mu)
    return torch.cat(out, dim=2)


def decode_chunks(decode_chunk, z: torch.Tensor) -> torch.Tensor:
    """One latent frame per chunk: decode_chunk(z (B, z, 1, h, w), caches | None) -> (frames, caches)."""
    caches = None
    out = []
    for i in range(z.shape[2]):
        frames, caches = decode_chunk(z[:, :, i:i + 1].contiguous(), caches)
        out.append(frames)
    return torch.cat(out, dim=2)
