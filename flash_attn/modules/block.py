"""Pre-norm transformer blocks with the dropout + residual add + norm fused into one op.

A pre-norm stack computes ``h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))``. Here each block
returns its branch output *before* the add, together with the running residual, and the next
norm (built with ``prenorm=True``) does ``dropout + add + norm`` in one call and returns the sum
as the new residual. The model's final norm closes the chain. The norms own the dropout
probabilities, the residual dtype and the backend; the blocks only route tensors.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Sequential pre-norm block: ln_1 -> attn, then ln_2 -> mlp.

    Args:
        attn: an :class:`~flash_attn.modules.mha.MHA` (any module taking x and keywords).
        mlp: an MLP module (x -> x's shape).
        ln_1, ln_2: :class:`~flash_attn.modules.norm.LayerNorm` / ``RMSNorm`` with
            ``prenorm=True``; ln_1's dropout applies to the incoming branch (embeddings or the
            previous mlp), ln_2's to the attention output.
    forward(hidden_states, residual=None, **attn_kwargs) -> (mlp_out, residual), both
        (batch, seqlen, d_model) (or (total_tokens, d_model) for varlen).
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, ln_1: nn.Module, ln_2: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, **attn_kwargs
    ):
        hidden, residual = self.ln_1(hidden_states, residual)
        hidden, residual = self.ln_2(self.attn(hidden, **attn_kwargs), residual)
        return self.mlp(hidden), residual


class ParallelBlock(nn.Module):
    """GPT-J / GPT-NeoX parallel block: h = h + attn(ln_1(h)) + mlp(ln_2(h)).

    Args:
        attn, mlp: as in :class:`Block`.
        ln_1: norm with ``prenorm=True``; its dropout applies to both incoming branches.
        ln_2: norm of the residual for the mlp branch (``prenorm=False``), or None: both
            branches read ln_1's output (GPT-J's single norm).
    forward(hidden_states1, hidden_states2=None, residual=None, **attn_kwargs) ->
    (attn_out, mlp_out, residual): the two branch outputs of this block, to be added (with
    dropout) by the next block's norm or the model's final norm.
    """

    def __init__(
        self, attn: nn.Module, mlp: nn.Module, ln_1: nn.Module, ln_2: nn.Module | None = None
    ):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, hidden_states1, hidden_states2=None, residual=None, **attn_kwargs):
        if hidden_states2 is not None:
            p = self.ln_1.dropout_p if self.training else 0.0
            hidden_states2 = nn.functional.dropout(hidden_states2, p, self.training)
            residual = hidden_states2 if residual is None else residual + hidden_states2
        hidden1, residual = self.ln_1(hidden_states1, residual)
        hidden2 = hidden1 if self.ln_2 is None else self.ln_2(residual.to(hidden1.dtype))
        return self.attn(hidden1, **attn_kwargs), self.mlp(hidden2), residual
