"""From padded batches to packed sequences and back, for the varlen attention functions.

Same names, arguments and return values as ``flash_attn.bert_padding`` in flash-attn 2.x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``input``: (first_axis, ...) -> (len(indices), ...). Differentiable."""
    return input[indices]


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int):
    """Scatter ``values`` (len(indices), ...) into zeros of shape (first_axis_dim, ...) at rows
    ``indices``. Differentiable."""
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_put((indices,), values)


def _packed(hidden_states: torch.Tensor, keep: torch.Tensor, seqlens: torch.Tensor):
    """Tokens where ``keep`` (batch, seqlen) is true, and the (indices, cu_seqlens, max_seqlen)
    of sequences of lengths ``seqlens`` laid one after another."""
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    # (B, S, ...) -> (B * S, ...) -> (total_tokens, ...)
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def _check_mask(name: str, mask: torch.Tensor, hidden_states: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.shape != hidden_states.shape[:2]:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{name} must be a (batch, seqlen) = {tuple(hidden_states.shape[:2])} tensor, got {got}"
        )


def unpad_input(
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    unused_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Keep the tokens where attention_mask (or unused_mask) is true, packed one sequence after
    another.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask: (batch, seqlen) bool or 0/1, true for real tokens.
        unused_mask: (batch, seqlen) bool or 0/1, true for slots that are allocated but unused:
            they are kept in the packed tensor (and counted in cu_seqlens) but not in the
            returned used lengths.
    Returns:
        hidden (total_tokens, ...); indices (total_tokens,) int64 into the flattened
        (batch * seqlen) positions; cu_seqlens (batch + 1,) int32; max_seqlen (int);
        used_seqlens (batch,) int32, the real tokens per sequence.
    """
    _check_mask("attention_mask", attention_mask, hidden_states)
    keep = attention_mask.bool()
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, hidden_states)
        keep = keep | unused_mask.bool()
    used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    seqlens = keep.sum(dim=-1, dtype=torch.int32)
    return (*_packed(hidden_states, keep, seqlens), used_seqlens)


def unpad_input_for_concatenated_sequences(
    hidden_states: torch.Tensor, attention_mask_in_length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Unpad rows that each hold several sequences one after another.

    Args:
        hidden_states: (batch, seqlen, ...).
        attention_mask_in_length: (batch, seqlen) int; row b lists the lengths of the sequences
            packed into row b of hidden_states, then zeros (e.g. ``[2, 3, 0, 0]``: tokens 0-1 are
            one sequence, 2-4 the next, the rest padding).
    Returns:
        hidden (total_tokens, ...); indices (total_tokens,) int64; cu_seqlens (num_seqs + 1,)
        int32 over every sequence of every row; max_seqlen (int).
    """
    _check_mask("attention_mask_in_length", attention_mask_in_length, hidden_states)
    lengths = attention_mask_in_length.flatten()
    seqlens = lengths[lengths > 0].to(torch.int32)
    row_lengths = attention_mask_in_length.sum(dim=-1)
    positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
    keep = positions[None, :] < row_lengths[:, None]  # (B, S): the first row_length tokens
    return _packed(hidden_states, keep, seqlens)


def pad_input(
    hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int
) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total_tokens, ...) -> (batch, seqlen, ...), zeros at
    padding. Differentiable."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
