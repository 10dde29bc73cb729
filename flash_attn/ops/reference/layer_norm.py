"""LayerNorm / RMSNorm with fused dropout and residual add, written out in plain PyTorch.

The statement of the math and the oracle of the kernel tests:

    residual_out = dropout(x) + residual        (residual_out = dropout(x) without a residual)
    LayerNorm:  y = (residual_out - mean) / sqrt(var + eps) * weight + bias
    RMSNorm:    y = residual_out / sqrt(mean(residual_out ** 2) + eps) * weight (+ bias)

Statistics are taken over the last dimension with the biased variance, as ``torch.nn.LayerNorm``.
Everything is computed in fp32 (fp64 for fp64 inputs) and y is returned in x's dtype; pass fp64
tensors for an oracle.
"""

from __future__ import annotations

import torch


def residual_dtype_for(
    x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool
) -> torch.dtype:
    """The dtype of residual_out: fp32 when residual_in_fp32, else the residual's (or x's)."""
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor | None = None, eps: float = 1e-5, dropout_p: float = 0.0,
    prenorm: bool = False, residual_in_fp32: bool = False, is_rms_norm: bool = False,
    *, dropout_mask: torch.Tensor | None = None,
):  # fmt: skip
    """dropout + residual add + LayerNorm (or RMSNorm), differentiable by autograd.

    Args:
        x: (..., hidden); residual: same shape as x, any float dtype, or None.
        weight: (hidden,); bias: (hidden,) or None.
        eps: added to the variance (LayerNorm) or the mean square (RMSNorm).
        dropout_p: probability of zeroing an element of x (kept ones are scaled by 1/(1-p)).
        prenorm: also return residual_out.
        residual_in_fp32: residual_out is fp32 (else the residual's dtype, or x's).
        is_rms_norm: RMSNorm instead of LayerNorm (no centring).
        dropout_mask: bool, x's shape, True where x is kept. Drawn from torch's generator when
            dropout_p > 0 and it is None.
    Returns:
        y in x's dtype, x's shape; or (y, residual_out) when prenorm.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute_dtype)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(h) >= dropout_p
        h = h * dropout_mask / (1.0 - dropout_p)
    if residual is not None:
        h = h + residual.to(compute_dtype)
    residual_out = h.to(residual_dtype_for(x, residual, residual_in_fp32))

    if is_rms_norm:
        xhat = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    else:
        mean = h.mean(dim=-1, keepdim=True)
        var = (h - mean).square().mean(dim=-1, keepdim=True)
        xhat = (h - mean) * torch.rsqrt(var + eps)
    y = xhat * weight.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    y = y.to(x.dtype)
    return (y, residual_out) if prenorm else y


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor | None = None, eps: float = 1e-6, dropout_p: float = 0.0,
    prenorm: bool = False, residual_in_fp32: bool = False,
    *, dropout_mask: torch.Tensor | None = None,
):  # fmt: skip
    """:func:`layer_norm_ref` with ``is_rms_norm=True``."""
    return layer_norm_ref(
        x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32,
        is_rms_norm=True, dropout_mask=dropout_mask,
    )  # fmt: skip
