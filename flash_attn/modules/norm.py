"""LayerNorm and RMSNorm modules with fused dropout + residual add.

Each norm owns its whole configuration (eps, dropout, prenorm, residual dtype, backend), so a
block only calls ``ln(x, residual)``. Their state dicts match ``torch.nn.LayerNorm`` (weight,
bias) and Hugging Face's Llama RMSNorm (weight), so checkpoints load without renaming; with
``zero_centered_weight`` the stored weight is w - 1 (Gemma's convention) and starts at 0.

``RMSNorm2x`` and ``LayerNorm2x`` have flash-attn 2.x's interface (prenorm and
residual_in_fp32 given per call); ``flash_attn.ops.triton.layer_norm`` re-exports them as
``RMSNorm`` and ``LayerNorm``.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_attn.ops.layer_norm import layer_norm_fn


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension of dropout(x) + residual.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the variance.
        dropout_p: dropout on x before the residual add, applied in training mode only.
        prenorm: forward returns (out, residual_out) for pre-norm blocks.
        residual_in_fp32: without a residual, residual_out is fp32 (see ``layer_norm_fn``).
        bias: learn a bias (LayerNorm) / no bias (default for RMSNorm).
        backend: passed to :func:`flash_attn.ops.layer_norm.layer_norm_fn`.
        zero_centered_weight: the norm multiplies by (1 + weight), weight initialised to 0.
    """

    is_rms_norm = False

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        bias: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
        zero_centered_weight: bool = False,
    ):
        super().__init__()
        self.hidden_size, self.eps, self.dropout_p = hidden_size, eps, dropout_p
        self.prenorm, self.residual_in_fp32, self.backend = prenorm, residual_in_fp32, backend
        self.zero_centered_weight = zero_centered_weight
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype)) if bias else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity: weight 1 (0 when zero-centred), bias 0."""
        nn.init.constant_(self.weight, 0.0 if self.zero_centered_weight else 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x, residual: (..., hidden_size) -> out, or (out, residual_out) when prenorm."""
        return self.normalize(x, residual, self.prenorm, self.residual_in_fp32)

    def normalize(
        self, x: torch.Tensor, residual: torch.Tensor | None, prenorm: bool, residual_in_fp32: bool
    ):
        """forward with prenorm and residual_in_fp32 given per call rather than configured."""
        return layer_norm_fn(
            x,
            self.weight,
            self.bias,
            residual,
            eps=self.eps,
            dropout_p=self.dropout_p if self.training else 0.0,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight,
            is_rms_norm=self.is_rms_norm,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, eps={self.eps}, dropout_p={self.dropout_p}, "
            f"prenorm={self.prenorm}, bias={self.bias is not None}, "
            f"zero_centered_weight={self.zero_centered_weight}"
        )


class RMSNorm(LayerNorm):
    """RMSNorm over the last dimension of dropout(x) + residual (weight only by default).

    Same arguments as :class:`LayerNorm`; eps defaults to 1e-6 as in Llama.
    """

    is_rms_norm = True

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        bias: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
        zero_centered_weight: bool = False,
    ):
        super().__init__(
            hidden_size,
            eps,
            dropout_p,
            prenorm,
            residual_in_fp32,
            bias,
            backend,
            device,
            dtype,
            zero_centered_weight,
        )


class _PerCallOptions:
    """flash-attn 2.x's norm interface: prenorm and residual_in_fp32 are given per call."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x, residual: (..., hidden_size) -> out, or (out, residual_out) when prenorm."""
        return self.normalize(x, residual, prenorm, residual_in_fp32)


class RMSNorm2x(_PerCallOptions, RMSNorm):
    """flash-attn 2.x's RMSNorm (no bias; eps 1e-5) on :class:`RMSNorm`."""

    def __init__(
        self,
        hidden_size,
        eps=1e-5,
        dropout_p=0.0,
        zero_centered_weight=False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            hidden_size,
            eps,
            dropout_p,
            device=device,
            dtype=dtype,
            zero_centered_weight=zero_centered_weight,
        )


class LayerNorm2x(_PerCallOptions, LayerNorm):
    """RMSNorm2x's interface for LayerNorm (with a bias), on :class:`LayerNorm`."""

    def __init__(
        self,
        hidden_size,
        eps=1e-5,
        dropout_p=0.0,
        zero_centered_weight=False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            hidden_size,
            eps,
            dropout_p,
            device=device,
            dtype=dtype,
            zero_centered_weight=zero_centered_weight,
        )
