"""Token + learned position embeddings (rotary positions live in MHA)."""

from __future__ import annotations

import torch
from torch import nn


class GPT2Embeddings(nn.Module):
    """wte(input_ids) + wpe(position_ids), with GPT-2's parameter names.

    Args:
        embed_dim: model width.
        vocab_size: rows of ``wte`` (already padded to a multiple, if wanted).
        max_position_embeddings: rows of ``wpe``; 0 for no learned positions (rotary models).
    """

    def __init__(
        self, embed_dim: int, vocab_size: int, max_position_embeddings: int, device=None, dtype=None
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.wte = nn.Embedding(vocab_size, embed_dim, **factory)
        self.max_position_embeddings = max_position_embeddings
        self.wpe = (
            nn.Embedding(max_position_embeddings, embed_dim, **factory)
            if max_position_embeddings > 0
            else None
        )

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """input_ids (batch, seqlen) int64; position_ids (batch, seqlen) or (seqlen,), default
        0..seqlen-1. Returns (batch, seqlen, embed_dim) in the embedding dtype.

        Indices are not range-checked here (that would synchronise a GPU every step):
        ``nn.Embedding`` raises on a CPU, and GPTLMHeadModel checks CPU inputs.
        """
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be int32/int64, got {input_ids.dtype}")
        out = self.wte(input_ids)
        if self.wpe is not None:
            seqlen = input_ids.shape[-1]
            if position_ids is None:
                position_ids = torch.arange(seqlen, device=input_ids.device)
            out = out + self.wpe(position_ids)
        return out
