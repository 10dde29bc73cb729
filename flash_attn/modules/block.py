"""Pre-norm transformer blocks with the dropout + residual add + norm fused into one op.

A pre-norm stack computes ``h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))``. Here each block
returns its branch output *before* the add, together with the running residual, and the next
norm does ``dropout + add + norm`` in one :func:`flash_attn.ops.layer_norm.layer_norm_fn` call
(``prenorm=True`` returns the sum as the new residual). The model's final norm closes the chain.
With ``residual_in_fp32`` the residual stream is kept in fp32 under fp16/bf16 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_attn.ops.layer_norm import layer_norm_fn


def dropout_add_norm(x, residual, norm, dropout_p, residual_in_fp32, backend):
    """norm(dropout(x) + residual), and that sum: (out, residual_out), both x's shape.

    norm is a :class:`~flash_attn.modules.norm.LayerNorm` / ``RMSNorm`` (its weights and eps are
    used); residual may be None (the first block).
    """
    return layer_norm_fn(
        x,
        norm.weight,
        norm.bias,
        residual,
        norm.eps,
        dropout_p,
        prenorm=True,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=norm.is_rms_norm,
        backend=backend,
    )


class Block(nn.Module):
    """Sequential pre-norm block: ln_1 -> attn, then ln_2 -> mlp.

    Args:
        attn: an :class:`~flash_attn.modules.mha.MHA` (any module taking x and keywords).
        mlp: an MLP module (x -> x's shape).
        ln_1, ln_2: norm modules (weights and eps are used with the fused op).
        resid_dropout1: dropout on the incoming branch (embeddings or previous mlp).
        resid_dropout2: dropout on the attention output.
        residual_in_fp32: keep the residual stream in fp32.
        norm_backend: backend of the fused dropout + add + norm (``"torch"`` to unfuse).
    forward(hidden_states, residual=None, **attn_kwargs) -> (mlp_out, residual), both
        (batch, seqlen, d_model) (or (total_tokens, d_model) for varlen).
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        ln_1: nn.Module,
        ln_2: nn.Module,
        resid_dropout1: float = 0.0,
        resid_dropout2: float = 0.0,
        residual_in_fp32: bool = False,
        norm_backend: str | None = None,
    ):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.resid_dropout1, self.resid_dropout2 = resid_dropout1, resid_dropout2
        self.residual_in_fp32, self.norm_backend = residual_in_fp32, norm_backend

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                **attn_kwargs):  # fmt: skip
        p1 = self.resid_dropout1 if self.training else 0.0
        p2 = self.resid_dropout2 if self.training else 0.0
        hidden, residual = dropout_add_norm(
            hidden_states, residual, self.ln_1, p1, self.residual_in_fp32, self.norm_backend
        )
        attn_out = self.attn(hidden, **attn_kwargs)
        hidden, residual = dropout_add_norm(
            attn_out, residual, self.ln_2, p2, self.residual_in_fp32, self.norm_backend
        )
        return self.mlp(hidden), residual


class ParallelBlock(nn.Module):
    """GPT-J / GPT-NeoX parallel block: h = h + attn(ln_1(h)) + mlp(ln_2(h)).

    With ``ln_2=None`` both branches read ln_1's output (GPT-J's single norm).
    forward(hidden_states1, hidden_states2=None, residual=None, **attn_kwargs) ->
    (attn_out, mlp_out, residual): the two branch outputs of this block, to be added (with
    dropout) by the next block's norm or the model's final norm.
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        ln_1: nn.Module,
        ln_2: nn.Module | None = None,
        resid_dropout: float = 0.0,
        residual_in_fp32: bool = False,
        norm_backend: str | None = None,
    ):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.resid_dropout = resid_dropout
        self.residual_in_fp32, self.norm_backend = residual_in_fp32, norm_backend

    def forward(self, hidden_states1, hidden_states2=None, residual=None, **attn_kwargs):
        p = self.resid_dropout if self.training else 0.0
        if hidden_states2 is not None:
            hidden_states2 = nn.functional.dropout(hidden_states2, p, self.training)
            residual = hidden_states2 if residual is None else residual + hidden_states2
        hidden1, residual = dropout_add_norm(
            hidden_states1, residual, self.ln_1, p, self.residual_in_fp32, self.norm_backend
        )
        if self.ln_2 is None:
            hidden2 = hidden1
        else:
            hidden2 = layer_norm_fn(
                residual.to(hidden1.dtype),
                self.ln_2.weight,
                self.ln_2.bias,
                eps=self.ln_2.eps,
                is_rms_norm=self.ln_2.is_rms_norm,
                backend=self.norm_backend,
            )
        return self.attn(hidden1, **attn_kwargs), self.mlp(hidden2), residual
