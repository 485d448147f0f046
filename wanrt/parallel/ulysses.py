"""Ulysses sequence parallelism for the DiT: `apply_ulysses(model, axis)`.

Each of the U ranks of the group holds a contiguous chunk of s = ceil(L / U) tokens of the video
sequence (the last chunk zero-padded). Everything in a block is per-token (norms, modulation, q/k
RMSNorm over the full width, RoPE, cross-attention to the replicated context, FFN) and runs on the
local chunk. Only self-attention needs the whole sequence; around it two all-to-alls swap the split:

    q, k, v (B, s, H, D) per rank --all-to-all--> (B, U*s, H/U, D): all tokens, H/U heads
    attention over the L real keys (padded keys dropped, so padding cannot change the result)
    out (B, U*s, H/U, D)         --all-to-all--> (B, s, H, D)

At the end the head outputs are all-gathered, so every rank returns the full prediction and the
sampler stays replicated. Unlike the official USP code, padded keys never take part in attention:
the result equals the single-process one for any token count.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wanrt.kernels.attention import attention
from wanrt.models.dit import WanDiT, WanSelfAttention

from .modules import rebase
from .plan import Axis, PlanError


class ShardedRope(NamedTuple):
    """RoPE tables of this rank's tokens (s, D/2), plus the real (unpadded) sequence length L.

    It travels where the model passes `rope` (through every block to self-attention), so the split
    needs no state on the modules.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    seq_len: int


def seq_to_heads(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """(..., s, H, D) local tokens, all heads -> (..., U*s, H/U, D) all tokens, this rank's heads."""
    u = axis.size
    *lead, s, h, d = x.shape
    send = x.reshape(*lead, s, u, h // u, d).movedim(-3, 0).contiguous()  # (U, ..., s, H/U, D): piece j to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)  # recv[j]: rank j's tokens, my heads
    return recv.movedim(0, -4).reshape(*lead, u * s, h // u, d)


def heads_to_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """(..., U*s, H/U, D) all tokens, this rank's heads -> (..., s, H, D) local tokens, all heads."""
    u = axis.size
    *lead, us, hu, d = x.shape
    send = x.reshape(*lead, u, us // u, hu, d).movedim(-4, 0).contiguous()  # (U, ..., s, H/U, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)  # recv[j]: my tokens, rank j's heads
    return recv.movedim(0, -3).reshape(*lead, us // u, u * hu, d)


def gather_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """(B, s, C) per rank -> (B, U*s, C) on every rank, chunks in rank order."""
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x.contiguous(), group=axis.group)
    return torch.cat(parts, dim=1)


class UlyssesSelfAttention(WanSelfAttention):
    """WanSelfAttention on a sequence chunk; same parameters, two all-to-alls around attention."""

    axis: Axis

    def forward(self, x: torch.Tensor, rope: ShardedRope) -> torch.Tensor:
        """x (B, s, dim) this rank's tokens -> (B, s, dim)."""
        q, k, v = self.qkv(x, (rope.cos, rope.sin))  # (B, s, H, D); q, k fp32
        # attention() would cast q and k to v's dtype anyway; doing it first halves their traffic in
        # a bf16 model and lets q, k, v travel in one all-to-all.
        qkv = seq_to_heads(torch.stack([q.to(v.dtype), k.to(v.dtype), v]), self.axis)  # (3, B, U*s, H/U, D)
        q, k, v = qkv.unbind(0)
        n = rope.seq_len  # the padding sits at the end of the gathered sequence: cut it from the keys
        out = attention(q, k[:, :n], v[:, :n])  # (B, U*s, H/U, D); padded queries are discarded later
        return self.o(heads_to_seq(out, self.axis).flatten(2))


class UlyssesDiT(WanDiT):
    """WanDiT whose forward splits the tokens over the group; same signature, same parameters."""

    axis: Axis

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor,
                y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                time_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                context_emb: torch.Tensor | None = None) -> torch.Tensor:
        f, h, w = self.grid(x)
        cos, sin = self.rope(f, h, w) if rope is None else rope  # (L, D/2) for the full grid
        u, r = self.axis.size, self.axis.rank
        e, e0 = self.embed_time(t) if time_emb is None else time_emb
        if context_emb is None:
            context_emb = self.embed_context(context, clip_fea)
        # The patch embedding is a cheap strided conv: every rank runs it whole and keeps its chunk.
        tokens = self.patchify(x, y)  # (B, L, dim)
        seq_len = tokens.shape[1]
        s = math.ceil(seq_len / u)
        pad = s * u - seq_len
        chunk = slice(r * s, (r + 1) * s)
        tokens = F.pad(tokens, (0, 0, 0, pad))[:, chunk]  # (B, s, dim); padded tokens are zeros
        # identity rotation for padded positions (their outputs are dropped, but keep them finite)
        cos = F.pad(cos, (0, 0, 0, pad), value=1.0)[chunk]
        sin = F.pad(sin, (0, 0, 0, pad), value=0.0)[chunk]
        # (B, s, prod(patch) * out_dim)
        out = self.forward_tokens(tokens, e, e0, context_emb, ShardedRope(cos, sin, seq_len))
        out = gather_seq(out, self.axis)[:, :seq_len]
        return self.unpatchify(out, f, h, w).float()


def apply_ulysses(model: WanDiT, axis: Axis) -> UlyssesDiT:
    """Sequence-parallel view of `model` over `axis` (U ranks). The self-attention modules of `model`
    are replaced in place, so use only the returned model afterwards."""
    if model.cfg.num_heads % axis.size:
        raise PlanError(f"--ulysses_size {axis.size}: the DiT's {model.cfg.num_heads} heads are not divisible")
    for block in model.blocks:
        block.self_attn = rebase(block.self_attn, UlyssesSelfAttention, axis=axis)
    return rebase(model, UlyssesDiT, axis=axis)
