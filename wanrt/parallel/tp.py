"""Megatron-style tensor parallelism for the DiT (`apply_tp`) and the T5 encoder (`apply_tp_t5`).

Per transformer block, on each of the T ranks:
- q/k/v (and the cross-attention k_img/v_img) are column-parallel: this rank keeps the output rows of
  its H/T heads, so attention runs locally on those heads;
- the q/k RMSNorm normalises over the FULL width (before the head split); its statistic (sum of
  squares, fp32) is summed over the group with one small all-reduce, so it is exact, and each rank
  applies its slice of the norm weight;
- `o` and the FFN's down projection are row-parallel: partial products are all-reduced (sum), then the
  bias is added once;
- the FFN's up projection is column-parallel (GELU is elementwise, so it stays local).
Embeddings, modulation and the head are replicated. Three activation all-reduces per block.

T5 gets the same treatment per layer (heads and the gated FFN split; the relative position bias
table split by head) plus a vocabulary-parallel token embedding: its 256k x 4096 table is the largest
tensor of the encoder. Weights are sliced from a loaded model (the load peak is one full copy per
rank; the steady state holds 1/T of the split weights).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from wanrt.kernels.fused import rope_ref
from wanrt.models.dit import WanDiT, WanRMSNorm, WanSelfAttention

from .modules import rebase
from .plan import Axis, PlanError

# ---------------------------------------------------------------------------------------- layers


def _shard(t: torch.Tensor, dim: int, axis: Axis) -> nn.Parameter:
    # clone: the rank keeps a compact copy and the full tensor can be freed
    return nn.Parameter(t.chunk(axis.size, dim)[axis.rank].clone(), requires_grad=False)


def column_parallel_(linear: nn.Linear, axis: Axis) -> nn.Linear:
    """Keep this rank's block of output features (weight rows, bias), in place."""
    linear.weight = _shard(linear.weight, 0, axis)
    if linear.bias is not None:
        linear.bias = _shard(linear.bias, 0, axis)
    linear.out_features = linear.weight.shape[0]
    return linear


class RowParallelLinear(nn.Linear):
    """Input features split over the group: local partial product, all-reduce, then the bias once."""

    axis: Axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight)
        dist.all_reduce(y, group=self.axis.group)
        return y if self.bias is None else y + self.bias


def row_parallel(linear: nn.Linear, axis: Axis) -> RowParallelLinear:
    new = rebase(linear, RowParallelLinear, axis=axis)
    new.weight = _shard(linear.weight, 1, axis)
    new.in_features = new.weight.shape[1]
    return new


class ShardedRMSNorm(WanRMSNorm):
    """WanRMSNorm of a width split over the group: mean of squares over the full width, via an
    all-reduce of fp32 partial sums; then the same rounding as rms_norm_ref and this rank's weight."""

    axis: Axis
    full_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ss = xf.pow(2).sum(dim=-1, keepdim=True)  # (..., 1) partial sum over this rank's channels
        dist.all_reduce(ss, group=self.axis.group)
        return (xf * torch.rsqrt(ss / self.full_dim + self.eps)).type_as(x) * self.weight


def sharded_norm(norm: WanRMSNorm, axis: Axis) -> ShardedRMSNorm:
    new = rebase(norm, ShardedRMSNorm, axis=axis, full_dim=norm.weight.shape[0])
    new.weight = _shard(norm.weight, 0, axis)
    return new


class TPSelfAttention(WanSelfAttention):
    """Self-attention on this rank's heads; the q/k norm is the sharded one (see ShardedRMSNorm)."""

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        # the fused qk_norm_rope kernel normalises over its input's width, which here is 1/T of it,
        # so the norm comes from the module and RoPE from the reference implementation
        b, s, n, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        q = rope_ref(self.norm_q(self.q(x)).view(b, s, n, d), *rope)  # (B, L, H/T, D) fp32
        k = rope_ref(self.norm_k(self.k(x)).view(b, s, n, d), *rope)
        v = self.v(x).view(b, s, n, d)
        return q, k, v


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + n) of the table on this rank; out-of-range ids give zeros, and the
    all-reduce sums exactly one non-zero row per token."""

    axis: Axis
    start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * inside.unsqueeze(-1)
        dist.all_reduce(out, group=self.axis.group)
        return out


def vocab_parallel(emb: nn.Embedding, axis: Axis) -> VocabParallelEmbedding:
    per = math.ceil(emb.num_embeddings / axis.size)
    start = min(axis.rank * per, emb.num_embeddings)
    new = rebase(emb, VocabParallelEmbedding, axis=axis, start=start)
    rows = emb.weight[start:start + per]
    if rows.shape[0] == 0:
        raise PlanError(f"--tp_size {axis.size}: the vocabulary ({emb.num_embeddings}) is too small to split")
    new.weight = nn.Parameter(rows.clone(), requires_grad=False)
    new.num_embeddings = rows.shape[0]
    return new


# ---------------------------------------------------------------------------------------- models


def _heads(n: int, axis: Axis, what: str) -> int:
    if n % axis.size:
        raise PlanError(f"--tp_size {axis.size}: the {what}'s {n} heads are not divisible by {axis.size}")
    return n // axis.size


def apply_tp(model: WanDiT, axis: Axis) -> WanDiT:
    """Split every DiT block over `axis` (T ranks), in place. Returns `model`."""
    if model.cfg.ffn_dim % axis.size:
        raise PlanError(f"--tp_size {axis.size}: the DiT's ffn_dim {model.cfg.ffn_dim} is not divisible")
    for block in model.blocks:
        attn = rebase(block.self_attn, TPSelfAttention)
        cross = block.cross_attn
        for m in (attn, cross):
            m.num_heads = _heads(m.num_heads, axis, "DiT")
            for name in ("q", "k", "v", "k_img", "v_img"):
                if hasattr(m, name):
                    column_parallel_(getattr(m, name), axis)
            for name in ("norm_q", "norm_k", "norm_k_img"):
                if hasattr(m, name):
                    setattr(m, name, sharded_norm(getattr(m, name), axis))
            m.o = row_parallel(m.o, axis)
        block.self_attn = attn
        column_parallel_(block.ffn[0], axis)
        block.ffn[2] = row_parallel(block.ffn[2], axis)
    return model


def apply_tp_t5(encoder, axis: Axis):
    """Split a T5TextEncoder (transformers UMT5EncoderModel inside) over `axis`, in place."""
    m = encoder.model
    emb = vocab_parallel(m.encoder.embed_tokens, axis)
    m.shared = m.encoder.embed_tokens = emb  # one (tied) table, as in the checkpoint
    for block in m.encoder.block:
        attn = block.layer[0].SelfAttention
        attn.n_heads = _heads(attn.n_heads, axis, "T5")
        attn.inner_dim = attn.n_heads * attn.key_value_proj_dim
        for lin in (attn.q, attn.k, attn.v):
            column_parallel_(lin, axis)
        attn.o = row_parallel(attn.o, axis)
        if attn.has_relative_attention_bias:  # (buckets, heads): keep this rank's heads
            bias = attn.relative_attention_bias
            bias.weight = _shard(bias.weight, 1, axis)
            bias.embedding_dim = bias.weight.shape[1]
        ff = block.layer[1].DenseReluDense
        for name in ("wi_0", "wi_1", "wi"):
            if hasattr(ff, name):
                column_parallel_(getattr(ff, name), axis)
        ff.wo = row_parallel(ff.wo, axis)
    return encoder
