"""T5 and CLIP fidelity: our encoders (loaded from the official layout through the key maps) against
transformers' UMT5EncoderModel / CLIPVisionModel loaded from the diffusers layout of the same weights,
and against transcriptions of the official formulas (wan/modules/t5.py, clip.py). fp32, CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wanrt.models import loading
from wanrt.models.checkpoint import open_weights
from wanrt.models.t5 import clean_prompt

PROMPTS = ["a bird flies over the sky", "  a red   disk moves up &amp; to the left  ", ""]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def models(tiny_official):
    return loading.load(tiny_official, components=("text_encoder", "image_encoder"))


# ------------------------------------------------------------------------------------------------- T5


def _official_t5(sd, ids, mask, heads, num_layers, eps=1e-6):
    """The official T5Encoder forward (fp32), transcribed from the spec: no attention scaling, per-layer
    relative position bias, RMS norm, gated tanh-GELU; then trim to the prompt and zero-pad."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def buckets(L, num_buckets=32, max_dist=128):
        rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
        nb = num_buckets // 2
        out = (rel > 0).long() * nb
        rel = rel.abs()
        max_exact = nb // 2
        large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact)
                             * (nb - max_exact)).long()
        large = torch.min(large, torch.full_like(large, nb - 1))
        return out + torch.where(rel < max_exact, rel, large)

    b, L = ids.shape
    x = sd["token_embedding.weight"][ids]
    for i in range(num_layers):
        p = f"blocks.{i}."
        bias = sd[p + "pos_embedding.embedding.weight"][buckets(L)].permute(2, 0, 1)[None]  # (1, n, L, L)
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{n}.weight"]).view(b, L, heads, -1) for n in "qkv")
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = attn.masked_fill(mask.view(b, 1, 1, L) == 0, torch.finfo(x.dtype).min).softmax(-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, L, -1), sd[p + "attn.o.weight"])
        h = norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    x = norm(x, sd["norm.weight"])
    lens = mask.sum(1)
    return torch.stack([torch.cat([u[:n], u.new_zeros(L - n, u.shape[1])]) for u, n in zip(x, lens)])


@torch.no_grad()
def test_t5_matches_official_formula(models, tiny_official):
    enc = models.text_encoder
    ids, mask = enc.tokenize(PROMPTS)
    w = open_weights(tiny_official / loading.OFFICIAL_T5)
    sd = {k: w.read(k).float() for k in w.names()}
    ref = _official_t5(sd, ids, mask, enc.cfg.num_heads, enc.cfg.num_layers)
    ours = enc(ids, mask)
    err = rel_err(ours, ref)
    print(f"\nT5 vs official formula: rel err {err:.2e}")
    assert err < 5e-6, err  # measured 1.0e-6, tolerance 5e-6: the transcription sums in another order


@torch.no_grad()
def test_t5_matches_transformers_peer(models, tiny_diffusers):
    from transformers import AutoTokenizer, UMT5EncoderModel

    peer = UMT5EncoderModel.from_pretrained(tiny_diffusers / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(tiny_diffusers / "tokenizer")
    enc = tok([clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    hidden = peer(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    lens = enc.attention_mask.sum(1)
    ref = torch.stack([torch.cat([u[:n], u.new_zeros(512 - n, u.shape[1])]) for u, n in zip(hidden, lens)])
    # the official checkpoint stores T5 in bf16, the diffusers one in fp32: load the peer's weights into ours
    ours_model = loading.load(tiny_diffusers, components=("text_encoder",)).text_encoder
    out = ours_model.encode(PROMPTS)
    err = rel_err(out, ref)
    print(f"\nT5 vs transformers UMT5EncoderModel: rel err {err:.2e}")
    assert err < 1e-6, err  # measured 0 (same ops as transformers), tolerance 1e-6: a few fp32 ulps
    # rows after each prompt's tokens (EOS included) are exactly zero
    for row, n in zip(out, lens):
        assert row[n:].abs().max() == 0 and row[n - 1].abs().max() > 0


def test_prompt_cleaning():
    assert clean_prompt("  a   b\n\tc &amp;amp; d ") == "a b c & d"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


# ----------------------------------------------------------------------------------------------- CLIP


def _official_clip_visual(sd, pixels, heads, layers_used, eps=1e-5):
    """open-clip VisionTransformer forward with use_31_block=True, from the official `visual.*` keys."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    x = F.conv2d(pixels, sd["visual.patch_embedding.weight"], stride=sd["visual.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).permute(0, 2, 1)
    b, _, c = x.shape
    x = torch.cat([sd["visual.cls_embedding"].expand(b, -1, -1), x], 1) + sd["visual.pos_embedding"]
    x = ln(x, "visual.pre_norm")
    for i in range(layers_used):
        p = f"visual.transformer.{i}."
        h = ln(x, p + "norm1")
        qkv = F.linear(h, sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, -1, 3, heads, c // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(a.transpose(1, 2).reshape(b, -1, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


def _frames(n=2, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


@torch.no_grad()
def test_clip_preprocess_is_official(models):
    enc = models.image_encoder
    frames = _frames()
    s = enc.cfg.image_size
    ref = F.interpolate(frames, size=(s, s), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    mean = torch.tensor(enc.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(frames), (ref - mean) / std, rtol=0, atol=1e-6)


@torch.no_grad()
def test_clip_matches_official_formula(models, tiny_official):
    enc = models.image_encoder
    w = open_weights(tiny_official / loading.OFFICIAL_CLIP)
    sd = {k: w.read(k) for k in w.names() if k.startswith("visual.")}
    pixels = enc.preprocess(_frames())
    ref = _official_clip_visual(sd, pixels, enc.cfg.num_heads, enc.cfg.num_layers - 1)
    err = rel_err(enc(pixels), ref)
    print(f"\nCLIP vs official formula: rel err {err:.2e}")
    assert err < 1e-6, err  # measured 0, tolerance 1e-6: a few fp32 ulps


@torch.no_grad()
def test_clip_matches_transformers_peer(models, tiny_diffusers):
    from transformers import CLIPVisionModel

    peer = CLIPVisionModel.from_pretrained(tiny_diffusers / "image_encoder").eval()
    assert peer.config.num_hidden_layers == models.image_encoder.cfg.num_layers  # the peer has the full depth
    pixels = models.image_encoder.preprocess(_frames())
    ref = peer(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    out = models.image_encoder(pixels)
    assert out.shape == (2, models.image_encoder.cfg.num_tokens, models.image_encoder.cfg.dim)
    err = rel_err(out, ref)
    print(f"\nCLIP vs transformers CLIPVisionModel hidden_states[-2]: rel err {err:.2e}")
    assert err < 1e-6, err  # measured 0, tolerance 1e-6: a few fp32 ulps
