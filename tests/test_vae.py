"""WanVAE: parity with diffusers AutoencoderKLWan, the functional chunk steps, input checks, key set.

All CPU fp32 on the tiny config (dim=8) except the key-set test, which builds the 14B VAE on the meta device.
Run with `-s` to see the measured parity numbers.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from wanrt.models.config import WanConfig
from wanrt.models.convert import rename, vae_official_to_diffusers
from wanrt.models.vae import WanVAE

diffusers = pytest.importorskip("diffusers")

# measured (relative to the reference's largest value): 0 at batch 1 for encode and decode (same ops, same
# order as diffusers), 2.5e-7 (encode) / 1.6e-6 (decode) at batch 2 (batched GEMM blocking). Tolerances:
# 1e-6 at batch 1 (a few fp32 ulps: any formula difference is >= 1e-4), 2e-6 / 8e-6 at batch 2 (5-8x).
TOL_ENCODE = {1: 1e-6, 2: 2e-6}
TOL_DECODE = {1: 1e-6, 2: 8e-6}
H, W = 32, 48  # latent 4 x 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, so no path is trivially zero (the official init zeroes AttentionBlock.proj)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("gamma") else 0.1 * noise)
        # a smaller output conv keeps most decoded pixels inside (-1, 1), so the clamp hides little
        model.decoder.head[2].weight.mul_(0.3)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = WanVAE(WanConfig.tiny().vae).eval()
    randomise(ours)
    cfg = ours.cfg
    peer = diffusers.AutoencoderKLWan(
        base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        attn_scales=[], temperal_downsample=list(cfg.temperal_downsample),
    ).eval()
    peer.load_state_dict(rename(ours.state_dict(), vae_official_to_diffusers), strict=True)
    return ours, peer


def official_normalise(mu: torch.Tensor, cfg) -> torch.Tensor:
    """WanVAE_.encode: (mu - mean) * (1 / std), with scale = [mean, 1 / std] as fp32 tensors."""
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.std).view(1, -1, 1, 1, 1)
    return (mu - mean) * inv_std


def official_unnormalise(z: torch.Tensor, cfg) -> torch.Tensor:
    """WanVAE_.decode: z / (1 / std) + mean."""
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.std).view(1, -1, 1, 1, 1)
    return z / inv_std + mean


# ---------------------------------------------------------------------------------------------------
# 1. Parity with diffusers


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 5), (1, 9), (1, 17), (2, 9)])
@torch.no_grad()
def test_encode_matches_diffusers(pair, batch, frames):
    ours, peer = pair
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(batch, 3, frames, H, W, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]
    z = ours.encode(video)
    ref = official_normalise(peer.encode(video).latent_dist.mode(), ours.cfg)
    assert z.shape == (batch, 16, 1 + (frames - 1) // 4, H // 8, W // 8)
    err = rel_err(z, ref)
    print(f"\nencode B={batch} T={frames}: rel err {err:.3e} (max|ref| {ref.abs().max().item():.3f})")
    assert err <= TOL_ENCODE[batch], err


@pytest.mark.parametrize("batch,latent_frames", [(1, 1), (1, 2), (1, 3), (1, 5), (2, 3)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, batch, latent_frames):
    ours, peer = pair
    g = torch.Generator().manual_seed(100 + latent_frames)
    z = torch.randn(batch, 16, latent_frames, H // 8, W // 8, generator=g)  # normalised latent
    video = ours.decode(z)
    ref = peer.decode(official_unnormalise(z, ours.cfg)).sample  # diffusers clamps to [-1, 1] too
    assert video.shape == (batch, 3, 1 + 4 * (latent_frames - 1), H, W)
    assert video.abs().max() <= 1.0
    err = rel_err(video, ref)
    saturated = (ref.abs() == 1).float().mean().item()
    print(f"\ndecode B={batch} T_lat={latent_frames}: rel err {err:.3e} (clamped pixels {saturated:.1%})")
    assert err <= TOL_DECODE[batch], err


def test_nearest_exact_equals_nearest_for_2x():
    for size_in in [(7, 10), (1, 1), (45, 80)]:
        x = torch.randn(2, 3, *size_in)
        exact = F.interpolate(x, scale_factor=(2.0, 2.0), mode="nearest-exact")
        assert torch.equal(exact, F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------
# 2. The functional chunk steps


@torch.no_grad()
def test_encode_is_a_loop_over_encode_chunk(pair):
    ours, _ = pair
    b, t = 2, 13
    video = torch.rand(b, 3, t, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shapes = ours.encoder_cache_shapes(b, H, W)
    caches, outs = None, []
    chunks = [video[:, :, :1]] + [video[:, :, 1 + 4 * i:5 + 4 * i] for i in range((t - 1) // 4)]
    for chunk in chunks:
        if caches is not None:
            before = [c.clone() for c in caches]
        mu, new = ours.encode_chunk(chunk, caches)
        assert mu.shape == (b, 16, 1, H // 8, W // 8)
        # every chunk, the first included, returns exactly the steady-state cache shapes
        assert [tuple(c.shape) for c in new] == shapes
        if caches is not None:  # functional: the inputs are not modified in place
            assert all(torch.equal(x, y) for x, y in zip(caches, before))
        caches = new
        outs.append(mu)
    assert torch.equal(torch.cat(outs, dim=2), ours.encode(video))
    # and calling a steady-state step twice with the same inputs gives the same result (no hidden state)
    a, ca = ours.encode_chunk(chunks[-1], caches)
    b2, cb = ours.encode_chunk(chunks[-1], caches)
    assert torch.equal(a, b2) and all(torch.equal(x, y) for x, y in zip(ca, cb))


@torch.no_grad()
def test_decode_is_a_loop_over_decode_chunk(pair):
    ours, _ = pair
    b, t = 2, 4
    z = torch.randn(b, 16, t, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    shapes = ours.decoder_cache_shapes(b, H, W)
    caches, outs = None, []
    for i in range(t):
        frames, caches = ours.decode_chunk(z[:, :, i:i + 1], caches)
        assert frames.shape == (b, 3, 1 if i == 0 else 4, H, W)
        assert [tuple(c.shape) for c in caches] == shapes
        outs.append(frames)
    assert torch.equal(torch.cat(outs, dim=2), ours.decode(z))


def test_cache_shapes_count_every_temporal_conv():
    vae = WanVAE(WanConfig.tiny().vae)
    d = vae.cfg.dim
    enc = vae.encoder_cache_shapes(1, 64, 96)
    dec = vae.decoder_cache_shapes(1, 64, 96)
    # encoder: conv1, 2 per ResidualBlock (8 + 2 middle), 2 time_convs, head; decoder: same with 12 + 2 RBs
    assert len(enc) == 1 + 2 * 10 + 2 + 1
    assert len(dec) == 1 + 2 * 14 + 2 + 1
    assert enc[0] == (1, 3, 2, 64, 96) and enc[-1] == (1, 4 * d, 2, 8, 12)
    assert (1, 2 * d, 1, 16, 24) in enc and (1, 4 * d, 1, 8, 12) in enc  # downsample3d: 1 frame
    assert dec[0] == (1, 16, 2, 8, 12) and dec[-1] == (1, d, 2, 64, 96)
    assert (1, 4 * d, 2, 8, 12) in dec and (1, 4 * d, 2, 16, 24) in dec  # upsample3d: 2 frames


# ---------------------------------------------------------------------------------------------------
# 3. Bad input


def test_bad_input_raises(pair):
    ours, _ = pair
    for t in (2, 4, 6, 8):
        with pytest.raises(ValueError, match=rf"4n\+1.*T={t}"):
            ours.encode(torch.zeros(1, 3, t, H, W))
    for h, w in ((30, 48), (32, 44), (12, 12)):
        with pytest.raises(ValueError, match=f"multiples of 8.*{h}x{w}"):
            ours.encode(torch.zeros(1, 3, 5, h, w))
        with pytest.raises(ValueError, match="multiples of 8"):
            ours.encoder_cache_shapes(1, h, w)
    with pytest.raises(ValueError, match="3 channels"):
        ours.encode(torch.zeros(1, 4, 5, H, W))
    with pytest.raises(ValueError, match="16"):
        ours.decode(torch.zeros(1, 8, 2, 4, 6))
    with pytest.raises(ValueError, match="first"):  # a first chunk is 1 frame
        ours.encode_chunk(torch.zeros(1, 3, 4, H, W), None)
    with torch.no_grad():
        _, caches = ours.encode_chunk(torch.zeros(1, 3, 1, H, W), None)
        with pytest.raises(ValueError, match="caches"):
            ours.encode_chunk(torch.zeros(1, 3, 4, H, W), caches[:-1])


# ---------------------------------------------------------------------------------------------------
# 4. The official key set, and the meta-device load path


def official_vae_keys() -> set[str]:
    """Wan2.1_VAE.pth keys written out from the spec (section 5), independently of the module tree."""
    rb = ["residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma",
          "residual.6.weight", "residual.6.bias"]
    wb = ["weight", "bias"]
    attn = ["norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"]
    keys = {f"{top}.{k}" for top in ("conv1", "conv2") for k in wb}
    for side in ("encoder", "decoder"):
        keys |= {f"{side}.conv1.{k}" for k in wb} | {f"{side}.head.2.{k}" for k in wb}
        keys |= {f"{side}.head.0.gamma"} | {f"{side}.middle.1.{k}" for k in attn}
        keys |= {f"{side}.middle.{i}.{k}" for i in (0, 2) for k in rb}
    e = "encoder.downsamples"
    keys |= {f"{e}.{i}.{k}" for i in (0, 1, 3, 4, 6, 7, 9, 10) for k in rb}
    keys |= {f"{e}.{i}.shortcut.{k}" for i in (3, 6) for k in wb}
    keys |= {f"{e}.{i}.resample.1.{k}" for i in (2, 5, 8) for k in wb}
    keys |= {f"{e}.{i}.time_conv.{k}" for i in (5, 8) for k in wb}
    d = "decoder.upsamples"
    keys |= {f"{d}.{i}.{k}" for i in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14) for k in rb}
    keys |= {f"{d}.4.shortcut.{k}" for k in wb}
    keys |= {f"{d}.{i}.resample.1.{k}" for i in (3, 7, 11) for k in wb}
    keys |= {f"{d}.{i}.time_conv.{k}" for i in (3, 7) for k in wb}
    return keys


def test_14b_key_set_matches_official_and_diffusers():
    with torch.device("meta"):
        ours = WanVAE(WanConfig.flf2v_14b().vae)
        peer = diffusers.AutoencoderKLWan()  # defaults = the official Wan2.1 VAE
    sd = ours.state_dict()
    assert set(sd) == official_vae_keys()
    assert len(sd) == 194  # encoder 84, decoder 106, top-level conv1/conv2 4
    assert "decoder.upsamples.11.time_conv.weight" not in sd  # level 2 -> 3 upsamples only spatially
    expected_shapes = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.8.resample.1.weight": (384, 384, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for k, shape in expected_shapes.items():
        assert tuple(sd[k].shape) == shape, k
    mapped = {vae_official_to_diffusers(k): tuple(v.shape) for k, v in sd.items()}
    peer_sd = peer.state_dict()
    assert set(mapped) == set(peer_sd)
    assert all(mapped[k] == tuple(peer_sd[k].shape) for k in mapped)


@torch.no_grad()
def test_meta_build_then_assign_load(pair):
    ours, _ = pair
    sd = ours.state_dict()
    assert "mean" not in sd and "std" not in sd  # config constants, not checkpoint tensors
    with torch.device("meta"):
        loaded = WanVAE(ours.cfg)
    loaded.load_state_dict(sd, strict=True, assign=True)
    loaded.reset_buffers()
    loaded.eval()
    assert loaded.mean.device.type == "cpu" and torch.equal(loaded.std, ours.std)
    video = torch.rand(1, 3, 5, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(loaded.encode(video), ours.encode(video))


# ---------------------------------------------------------------------------------------------------
# 3. A decoder wider than the encoder (VAEConfig.decoder_dim = diffusers' decoder_base_dim)


@pytest.mark.parametrize("latent_frames", [1, 3])
@torch.no_grad()
def test_wider_decoder_matches_diffusers(latent_frames):
    cfg = dataclasses.replace(WanConfig.tiny().vae, decoder_dim=12)  # encoder base 8, decoder base 12
    ours = WanVAE(cfg).eval()
    randomise(ours, seed=3)
    assert ours.decoder.conv1.weight.shape[0] == 12 * cfg.dim_mult[-1]
    peer = diffusers.AutoencoderKLWan(
        base_dim=cfg.dim, decoder_base_dim=12, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=[], temperal_downsample=list(cfg.temperal_downsample),
    ).eval()
    peer.load_state_dict(rename(ours.state_dict(), vae_official_to_diffusers), strict=True)
    z = torch.randn(1, 16, latent_frames, H // 8, W // 8, generator=torch.Generator().manual_seed(7))
    err = rel_err(ours.decode(z), peer.decode(official_unnormalise(z, cfg)).sample)
    print(f"\nwide decoder T_lat={latent_frames}: rel err {err:.3e}")
    assert err <= TOL_DECODE[1], err  # same bound as the symmetric VAE's batch-1 decode


@torch.no_grad()
def test_widen_decoder_keeps_the_decoding_and_trains_the_new_channels():
    from wanrt.tiny.train import widen_decoder

    ours = WanVAE(WanConfig.tiny().vae).eval()
    randomise(ours, seed=4)
    wide = widen_decoder(ours, 12).eval()
    assert wide.cfg.decoder_dim == 12 and wide.decoder.conv1.weight.shape[0] == 48
    z = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(8))  # 3 chunks: time_conv runs
    ref = ours.decode(z)
    err = rel_err(wide.decode(z), ref)
    # measured 1.4e-6 (fp32 sums in another order over more, zero, channels); bound 3.5x. The old gammas left
    # as they were (no RMS_norm sqrt(C_old / C_new) rescale) move it by 0.57 (measured), far over 1e-2
    print(f"\nwidened decoder vs narrow: rel err {err:.3e}")
    assert err <= 5e-6, err
    naive = copy.deepcopy(wide)
    for m_old, m_new in zip(ours.decoder.modules(), naive.decoder.modules()):
        if hasattr(m_old, "gamma"):
            m_new.gamma[: m_old.gamma.shape[0]] = m_old.gamma  # the old gammas as they were: no sqrt(C) rescale
    naive_err = rel_err(naive.decode(z), ref)
    print(f"without the RMS_norm rescale: rel err {naive_err:.3e}")
    assert naive_err > 1e-2
    # every new channel can learn: the weights producing them get gradients (a zero-in, zero-out start would not)
    with torch.enable_grad():
        wide.train()
        wide.decode(z).square().mean().backward()
    grad = wide.decoder.conv1.weight.grad  # (48, 16, 3, 3, 3): rows 32.. are new
    assert grad[32:].abs().sum() > 0
    qkv = wide.decoder.middle[1].to_qkv.weight.grad  # (144, 48, 1, 1): q rows 32..48 are new
    assert qkv[32:48].abs().sum() > 0
