"""The UMT5-XXL text encoder as `transformers.UMT5EncoderModel`, with the official tokenisation.

The official encoder (wan/modules/t5.py) is the standard UMT5 encoder: per-layer relative position
bias, no 1/sqrt(d) scaling, RMS LayerNorm, gated tanh-GELU FFN. Official `.pth` keys load through
`convert.t5_official_to_hf`. Output rows after each prompt's tokens (EOS included) are exactly zero,
which is what the DiT sees after the official trim-then-zero-pad.
"""

from __future__ import annotations

import html
import re

import torch
import torch.nn as nn
from transformers import UMT5Config, UMT5EncoderModel

from .config import T5Config


def clean_prompt(text: str) -> str:
    """Official 'whitespace' cleaning: ftfy, html-unescape twice, collapse whitespace."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def hf_config(cfg: T5Config) -> UMT5Config:
    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_attn // cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        layer_norm_epsilon=cfg.eps, dropout_rate=0.0, is_encoder_decoder=False, tie_word_embeddings=False,
        use_cache=False,
    )


class T5TextEncoder(nn.Module):
    """forward(ids, mask) -> (B, text_len, dim); `encode(prompts)` tokenizes first."""

    def __init__(self, cfg: T5Config, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.model = UMT5EncoderModel(hf_config(cfg))
        self.tokenizer = tokenizer

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids, mask (B, text_len) int64: cleaned, EOS appended, padded with id 0, truncated."""
        if self.tokenizer is None:
            raise RuntimeError("this text encoder was built without a tokenizer")
        enc = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.cfg.text_len, add_special_tokens=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, dim)
        # The official pipeline trims to the prompt length and the DiT zero-pads back to 512.
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        device = self.model.shared.weight.device
        return self(ids.to(device), mask.to(device))
