"""Exact fusion (wanrt/kernels/fusion.py): q/k/v and the cross-attention k/v as one GEMM each give the
unfused model's output (fp32: rel. L2 <= 1e-6), for bf16 and FP8 weights too, with no weight held twice."""

from __future__ import annotations

import pytest
import torch

from wanrt.kernels import fp8
from wanrt.kernels.fusion import fuse_projections, is_fused
from wanrt.models.loading import load


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def inputs():
    cfg = load("tiny", components=["dit"]).config.dit
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g) * 0.2
    context[:, 24:] = 0
    return (torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([900, 900]), context,
            torch.randn(2, 2 * cfg.clip_tokens, cfg.clip_dim, generator=g), torch.randn(2, 20, 3, 8, 8, generator=g))


def _pair(**load_kw):
    ref = load("tiny", components=["dit"], **load_kw).dit
    fused = fuse_projections(load("tiny", components=["dit"], **load_kw).dit)
    return ref, fused


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8"])
def test_fused_projections_give_the_same_output(kind, inputs):
    kw = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "fp8": {"precision": "fp8"}}[kind]
    ref, fused = _pair(**kw)
    attn = fused.blocks[0].self_attn
    assert is_fused(fused) and not hasattr(attn, "q") and not hasattr(fused.blocks[0].cross_attn, "k")
    dim = fused.cfg.dim
    assert attn.qkv_proj.weight.shape == (3 * dim, dim)
    assert fused.blocks[0].cross_attn.kv_proj.weight.shape == (2 * dim, dim)
    if kind == "fp8":
        assert isinstance(attn.qkv_proj, fp8.FP8Linear) and attn.qkv_proj.weight_scale.shape == (3 * dim,)
    assert _tensor_bytes(fused) == _tensor_bytes(ref)  # concatenated, not copied: nothing held twice
    err = rel_l2(_run(fused, inputs), _run(ref, inputs))
    # measured 0.0 for fp32, bf16 and fp8 on this CPU (each output column is the same dot product; the
    # per-token FP8 scale of x is the same for q, k and v). Tolerance 1e-6, the exactness bar.
    assert err <= 1e-6, err


def test_fusion_is_idempotent_and_checks_kinds():
    from wanrt.kernels.fusion import concat_linears

    model = fuse_projections(load("tiny", components=["dit"]).dit)
    before = _tensor_bytes(model)
    assert _tensor_bytes(fuse_projections(model)) == before
    lin = torch.nn.Linear(8, 8)
    with pytest.raises(TypeError, match="same kind"):
        concat_linears([lin, fp8.FP8Linear.from_linear(lin)])
