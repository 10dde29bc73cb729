"""``flash_attn.ops.triton.layer_norm`` of flash-attn 2.x: the same names, arguments, defaults
and return values, over :mod:`flash_attn.ops.layer_norm` and :mod:`flash_attn.modules.norm`.

Nothing in the library imports this module: it exists for code written for flash-attn 2.x.
"""

from __future__ import annotations

from flash_attn.modules import norm as _norm
from flash_attn.ops.layer_norm import layer_norm_fn, layer_norm_linear_fn, rms_norm_fn
from flash_attn.ops.reference import layer_norm as _reference

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "layer_norm_fn",
    "layer_norm_linear_fn",
    "layer_norm_ref",
    "rms_norm_fn",
    "rms_norm_ref",
]


def layer_norm_ref(
    x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
    rowscale=None, prenorm=False, zero_centered_weight=False, dropout_mask=None,
    dropout_mask1=None, upcast=False, *, is_rms_norm=False,
):  # fmt: skip
    """The official oracle: :func:`flash_attn.ops.reference.layer_norm.layer_norm_ref` with
    ``upcast`` (inputs cast to fp32 first; out keeps x's dtype, residual_out is fp32)."""
    out_dtype = x.dtype
    if upcast:
        x, weight, bias, residual, x1, weight1, bias1 = (
            t.float() if t is not None else None
            for t in (x, weight, bias, residual, x1, weight1, bias1)
        )
    return _reference.layer_norm_ref(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight=zero_centered_weight, is_rms_norm=is_rms_norm, out_dtype=out_dtype,
        dropout_mask=dropout_mask, dropout_mask1=dropout_mask1,
    )  # fmt: skip


def rms_norm_ref(
    x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
    rowscale=None, prenorm=False, zero_centered_weight=False, dropout_mask=None,
    dropout_mask1=None, upcast=False,
):  # fmt: skip
    """:func:`layer_norm_ref` for RMSNorm."""
    return layer_norm_ref(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
        zero_centered_weight, dropout_mask, dropout_mask1, upcast, is_rms_norm=True,
    )  # fmt: skip


class _OfficialCall:
    """flash-attn 2.x's norm interface: prenorm and residual_in_fp32 are given per call."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """x, residual: (..., hidden_size) -> out, or (out, residual_out) when prenorm."""
        return self.normalize(x, residual, prenorm, residual_in_fp32)


class RMSNorm(_OfficialCall, _norm.RMSNorm):
    """flash-attn 2.x's RMSNorm (no bias; eps 1e-5) on :class:`flash_attn.modules.norm.RMSNorm`."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False,
                 device=None, dtype=None):  # fmt: skip
        super().__init__(hidden_size, eps, dropout_p, device=device, dtype=dtype,
                         zero_centered_weight=zero_centered_weight)  # fmt: skip


class LayerNorm(_OfficialCall, _norm.LayerNorm):
    """RMSNorm's official interface for LayerNorm (with a bias), on
    :class:`flash_attn.modules.norm.LayerNorm`."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False,
                 device=None, dtype=None):  # fmt: skip
        super().__init__(hidden_size, eps, dropout_p, device=device, dtype=dtype,
                         zero_centered_weight=zero_centered_weight)  # fmt: skip
