"""WanDiT fidelity: against diffusers' WanTransformer3DModel on the same weights, against transcriptions of
the official formulas (RoPE in complex float64, sinusoid in float64), and the official 14B key set."""

from __future__ import annotations

import math

import pytest
import torch

from wanrt.models import convert
from wanrt.models.config import WanConfig
from wanrt.models.dit import WanDiT, precision_map, rope_angles, sinusoidal_embedding, to_precision
from wanrt.models.tiny import random_models

TINY = WanConfig.tiny().dit


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def dit() -> WanDiT:
    return random_models(seed=1)[1]


def _inputs(cfg, b=2, f=3, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 16, f, h, w, generator=g), context=torch.randn(b, 512, cfg.text_dim, generator=g),
                clip_fea=torch.randn(b, 2 * cfg.clip_tokens, cfg.clip_dim, generator=g),
                y=torch.randn(b, 20, f, h, w, generator=g))


def _peer(model: WanDiT):
    from diffusers import WanTransformer3DModel

    c = model.cfg
    peer = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim,
        num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=c.eps,
        image_dim=c.clip_dim, added_kv_proj_dim=c.dim, rope_max_seq_len=c.rope_max_len,
        pos_embed_seq_len=2 * c.clip_tokens).eval()
    peer.load_state_dict(convert.rename(model.state_dict(), convert.dit_official_to_diffusers), strict=True)
    return peer


def _peer_forward(peer, cfg, inp, t):
    clip = inp["clip_fea"].reshape(-1, cfg.clip_tokens, cfg.clip_dim)  # diffusers wants (2B, N, C)
    return peer(hidden_states=torch.cat([inp["x"], inp["y"]], 1), timestep=t, encoder_hidden_states=inp["context"],
                encoder_hidden_states_image=clip, return_dict=False)[0]


class _OfficialSinusoid(torch.nn.Module):
    """Stand-in for diffusers' fp32 `Timesteps` projection that computes the official float64 sinusoid."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return sinusoidal_embedding(t, self.dim).float()


@torch.no_grad()
def test_matches_diffusers(dit):
    """Tolerance 1e-5 relative (fp32, only summation-order differences). diffusers computes the timestep
    sinusoid in fp32 while the official code uses float64, so at large t the peer is fed the official
    sinusoid; at small t both are exact and the models are compared untouched."""
    peer = _peer(dit)
    inp = _inputs(TINY)
    t_small = torch.tensor([3, 17])
    err_small = rel_err(dit(t=t_small, **inp), _peer_forward(peer, TINY, inp, t_small))
    peer.condition_embedder.timesteps_proj = _OfficialSinusoid(TINY.freq_dim)
    t_big = torch.tensor([999, 500])
    err_big = rel_err(dit(t=t_big, **inp), _peer_forward(peer, TINY, inp, t_big))
    print(f"\nDiT vs diffusers: rel err {err_small:.2e} (t=3,17), {err_big:.2e} (t=999,500)")
    # measured 3.7e-7 at small t (summation order), tolerance 2e-6 (~5x); at large t measured 0, tolerance
    # 1e-6: our float64 time table against the official float64 sinusoid. A time table computed in fp32
    # gives 3.6e-6 here, so this is what proves the float64 table (README: Fidelity, DiT row).
    assert err_small < 2e-6, err_small
    assert err_big < 1e-6, err_big


@torch.no_grad()
def test_batch2_equals_two_batch1(dit):
    inp = _inputs(TINY)
    t = torch.tensor([999, 999])
    both = dit(t=t, **inp)
    for i in range(2):
        one = dit(t=t[i:i + 1], **{k: v[i:i + 1] for k, v in inp.items()})
        err = rel_err(both[i:i + 1], one)
        print(f"\nbatch 2 vs batch 1 [{i}]: rel err {err:.2e}")
        assert err < 2e-6, err  # measured 4.1e-7, tolerance 2e-6 (5x): only GEMM blocking differs with the batch


def _official_rope_apply(x, grid, head_dim):
    """Transcription of the official rope_apply (complex float64) for one sample, no padding."""
    def rope_params(max_len, dim, theta=10000):
        freqs = torch.outer(torch.arange(max_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).double().div(dim)))
        return torch.polar(torch.ones_like(freqs), freqs)

    d = head_dim
    freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                       rope_params(1024, 2 * (d // 6))], dim=1)
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    seq = f * h * w
    xi = torch.view_as_complex(x[0, :seq].double().reshape(seq, n, -1, 2))
    fi = torch.cat([freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                    freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                    freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(seq, 1, -1)
    return torch.view_as_real(xi * fi).flatten(2).float()[None]


@pytest.mark.parametrize("head_dim,grid", [(16, (3, 4, 6)), (128, (5, 7, 9)), (128, (21, 3, 2))])
def test_rope_equals_official_complex_float64(dit, head_dim, grid):
    from wanrt.kernels.fused import rope_ref

    cfg = TINY if head_dim == TINY.head_dim else WanConfig.flf2v_14b().dit
    model = dit if head_dim == TINY.head_dim else None
    if model is None:  # only the tables are needed: build them without the 14B weights
        angles = rope_angles(cfg.rope_max_len, cfg.head_dim)
        model = type("M", (), {})()
        model.cfg, model.rope_cos, model.rope_sin = cfg, torch.cos(angles).float(), torch.sin(angles).float()
        cos, sin = WanDiT.rope(model, *grid)
    else:
        cos, sin = model.rope(*grid)
    L = math.prod(grid)
    x = torch.randn(1, L, 2, head_dim, generator=torch.Generator().manual_seed(L)) * 3
    ours = rope_ref(x, cos, sin)
    ref = _official_rope_apply(x, grid, head_dim)
    err = (ours - ref).abs().max().item()
    print(f"\nRoPE vs official complex float64 (head_dim {head_dim}): max abs err {err:.2e}")
    # measured 9.5e-7, tolerance 1e-5 (10x) (the README's "< 1e-5 abs."): fp32 rounding of |x| ~ 10 values
    # (the official output is fp32 too); a wrong frequency split or axis order gives errors of order |x|
    assert err < 1e-5, err


def test_time_table_is_official_float64():
    t = torch.arange(1001)
    half = 128
    ref = torch.outer(t.double(), torch.pow(10000, -torch.arange(half).double().div(half)))
    ref = torch.cat([torch.cos(ref), torch.sin(ref)], dim=1).float()
    model_table = sinusoidal_embedding(t, 256).float()
    assert torch.equal(model_table, ref)


def test_rope_grid_limit(dit):
    with pytest.raises(ValueError, match="RoPE table"):
        dit.rope(1, 1025, 4)


def _official_14b_keys() -> dict[str, tuple[int, ...]]:
    """The official FLF2V-14B state_dict, transcribed from ../shared/spec/wan21-flf2v.md section 2.7."""
    D, F = 5120, 13824
    keys = {"patch_embedding.weight": (D, 36, 1, 2, 2), "patch_embedding.bias": (D,),
            "text_embedding.0.weight": (D, 4096), "text_embedding.0.bias": (D,),
            "text_embedding.2.weight": (D, D), "text_embedding.2.bias": (D,),
            "time_embedding.0.weight": (D, 256), "time_embedding.0.bias": (D,),
            "time_embedding.2.weight": (D, D), "time_embedding.2.bias": (D,),
            "time_projection.1.weight": (6 * D, D), "time_projection.1.bias": (6 * D,),
            "head.modulation": (1, 2, D), "head.head.weight": (64, D), "head.head.bias": (64,),
            "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
            "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
            "img_emb.proj.3.weight": (D, 1280), "img_emb.proj.3.bias": (D,),
            "img_emb.proj.4.weight": (D,), "img_emb.proj.4.bias": (D,), "img_emb.emb_pos": (1, 514, 1280)}
    for i in range(40):
        b = f"blocks.{i}."
        keys[b + "modulation"] = (1, 6, D)
        for n in "qkvo":
            keys[f"{b}self_attn.{n}.weight"], keys[f"{b}self_attn.{n}.bias"] = (D, D), (D,)
        for n in ("q", "k", "v", "o", "k_img", "v_img"):
            keys[f"{b}cross_attn.{n}.weight"], keys[f"{b}cross_attn.{n}.bias"] = (D, D), (D,)
        for n in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                  "cross_attn.norm_k_img"):
            keys[f"{b}{n}.weight"] = (D,)
        keys[b + "norm3.weight"], keys[b + "norm3.bias"] = (D,), (D,)
        keys[b + "ffn.0.weight"], keys[b + "ffn.0.bias"] = (F, D), (F,)
        keys[b + "ffn.2.weight"], keys[b + "ffn.2.bias"] = (D, F), (D,)
    return keys


def test_14b_meta_has_official_keys_and_shapes():
    with torch.device("meta"):
        model = WanDiT(WanConfig.flf2v_14b().dit)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _official_14b_keys()
    n_params = sum(math.prod(s) for s in ours.values())
    assert 16.0e9 < n_params < 16.8e9  # FLF2V-14B: ~16.4B parameters incl. embeddings
    # every official key has a diffusers name, one-to-one
    assert len(convert.invert(ours, convert.dit_official_to_diffusers)) == len(ours)


@torch.no_grad()
def test_bf16_precision_map(dit):
    """Matmul weights bf16, islands fp32; the bf16 model tracks fp32 within bf16 rounding."""
    import copy

    low = to_precision(copy.deepcopy(dit), torch.bfloat16)
    dtypes = precision_map(dit, torch.bfloat16)
    for name in ("time_embedding.0.weight", "time_projection.1.weight", "head.head.weight", "head.modulation",
                 "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight",
                 "img_emb.proj.0.weight", "img_emb.emb_pos"):
        assert dtypes[name] == torch.float32 and low.state_dict()[name].dtype == torch.float32, name
    for name in ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k_img.weight",
                 "blocks.0.ffn.0.weight", "text_embedding.0.weight", "img_emb.proj.1.weight"):
        assert dtypes[name] == torch.bfloat16 and low.state_dict()[name].dtype == torch.bfloat16, name
    inp = _inputs(TINY)
    t = torch.tensor([999, 500])
    ref, out = dit(t=t, **inp), low(t=t, **inp)
    assert out.dtype == torch.float32
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"\nbf16 precision map vs fp32: rel L2 {err:.2e}")
    # measured 4.0e-3, tolerance 3e-2 (7.5x); bounded below by 1e-3 so that a map that left the matmul
    # weights in fp32 (error ~1e-7) fails
    assert 1e-3 < err < 3e-2, err  # bf16: 8 mantissa bits (~4e-3 per rounding) over the layers
