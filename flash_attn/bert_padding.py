"""From padded batches to packed sequences and back, for the varlen attention functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpad_input(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Keep the tokens where attention_mask is true, packed one sequence after another.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen) bool or 0/1, true for real tokens.
    Returns:
        hidden (total_tokens, ...); indices (total_tokens,) int64 into the flattened
        (batch * seqlen) positions; cu_seqlens (batch + 1,) int32; max_seqlen (int);
        seqlens (batch,) int32, the tokens used per sequence.
    """
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    # (B, S, ...) -> (B * S, ...) -> (total_tokens, ...)
    hidden = hidden_states.flatten(0, 1)[indices]
    return hidden, indices, cu_seqlens, int(seqlens.max().item()), seqlens


def pad_input(hidden: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_tokens, ...) -> (batch, seqlen, ...), zeros at
    padding. Differentiable."""
    out = hidden.new_zeros((batch * seqlen, *hidden.shape[1:]))
    out = out.index_put((indices,), hidden)
    return out.view(batch, seqlen, *hidden.shape[1:])
