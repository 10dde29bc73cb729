"""LayerNorm / RMSNorm with fused dropout, rowscale and residual adds, in plain PyTorch.

The statement of the math and the oracle of the kernel tests:

    h   = dropout(x * rowscale) + dropout(x1) + residual     (each term optional)
    LayerNorm:  xhat = (h - mean(h)) / sqrt(var(h) + eps)
    RMSNorm:    xhat = h / sqrt(mean(h ** 2) + eps)
    out  = xhat * weight + bias,  out1 = xhat * weight1 + bias1   (weight + 1 when zero-centred)

Statistics are taken over the last dimension with the biased variance, as ``torch.nn.LayerNorm``.
Everything is computed in fp32 (fp64 for fp64 inputs); out is returned in out_dtype (default x's)
and h, the ``residual_out`` of pre-norm blocks, in the residual's dtype (fp32 without a residual
when residual_in_fp32, else x's). Pass fp64 tensors for an oracle. The helpers here are shared
with the functional API so both backends return the same structure.
"""

from __future__ import annotations

import torch


def residual_dtype_for(
    x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool
) -> torch.dtype:
    """The dtype of residual_out: the residual's; without one fp32 when residual_in_fp32, else
    x's (as flash-attn 2.x: residual_in_fp32 only applies where no residual is given)."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x.dtype


def draw_keep_masks(x: torch.Tensor, x1: torch.Tensor | None, dropout_p: float):
    """Bool keep masks (x's shape) for x and x1 from torch's generator; None when not needed."""
    if dropout_p == 0.0:
        return None, None
    keep1 = torch.rand(x1.shape, device=x.device) >= dropout_p if x1 is not None else None
    return torch.rand(x.shape, device=x.device) >= dropout_p, keep1


def norm_input(
    x: torch.Tensor,
    x1: torch.Tensor | None,
    residual: torch.Tensor | None,
    rowscale: torch.Tensor | None,
    dropout_p: float,
    keep: torch.Tensor | None,
    keep1: torch.Tensor | None,
) -> torch.Tensor:
    """h = dropout(x * rowscale) + dropout(x1) + residual in fp32 (fp64 for fp64 inputs).

    Args:
        x, x1, residual: (..., hidden); rowscale: x.shape[:-1]; keep, keep1: bool keep masks
            of x and x1 (x's shape), used when dropout_p > 0.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute_dtype)
    if rowscale is not None:
        h = h * rowscale.to(compute_dtype).unsqueeze(-1)
    if dropout_p > 0.0:
        h = h * keep / (1.0 - dropout_p)
    if x1 is not None:
        h1 = x1.to(compute_dtype)
        h = h + (h1 * keep1 / (1.0 - dropout_p) if dropout_p > 0.0 else h1)
    if residual is not None:
        h = h + residual.to(compute_dtype)
    return h


def affine_weight(weight: torch.Tensor, zero_centered_weight: bool, dtype: torch.dtype):
    """The weight the norm multiplies by: weight (+ 1 when zero-centred, Gemma style)."""
    w = weight.to(dtype)
    return w + 1.0 if zero_centered_weight else w


def pack_outputs(out, out1, residual_out, keep, keep1, prenorm, return_dropout_mask):
    """The return value of layer_norm_fn: out, then out1 (with a weight1), residual_out (with
    prenorm), and the two keep masks (with return_dropout_mask), flat; a lone out unwrapped."""
    values = [out]
    if out1 is not None:
        values.append(out1)
    if prenorm:
        values.append(residual_out)
    if return_dropout_mask:
        values += [keep, keep1]
    return values[0] if len(values) == 1 else tuple(values)


def explicit_norm(h: torch.Tensor, eps: float, is_rms_norm: bool, weight=None, bias=None):
    """The normalised h, written out: xhat = (h - mean) / sqrt(var + eps), or
    h / sqrt(mean(h^2) + eps); then xhat * weight + bias where they are given."""
    if is_rms_norm:
        xhat = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    else:
        centred = h - h.mean(dim=-1, keepdim=True)
        xhat = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    return affine(xhat, weight, bias)


def affine(xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """xhat * weight + bias, each optional."""
    y = xhat * weight if weight is not None else xhat
    return y + bias if bias is not None else y


def layer_norm_with(
    norm_fn,
    keep,
    keep1,
    x,
    weight,
    bias,
    residual,
    x1,
    weight1,
    bias1,
    eps,
    dropout_p,
    rowscale,
    prenorm,
    residual_in_fp32,
    zero_centered_weight,
    is_rms_norm,
    return_dropout_mask,
    out_dtype,
):
    """layer_norm_fn's math with the given keep masks and norm_fn(h, eps, is_rms_norm, weight,
    bias) -> xhat * weight + bias (xhat without them): the one body of the reference and of the
    torch backend (which normalises natively, weight and bias in the same call)."""
    h = norm_input(x, x1, residual, rowscale, dropout_p, keep, keep1)
    out_dtype = out_dtype or x.dtype

    def params(w, b):
        """(weight, bias) as the norm multiplies and adds them, in h's dtype."""
        return affine_weight(w, zero_centered_weight, h.dtype), None if b is None else b.to(h.dtype)

    if weight1 is None:
        out, out1 = norm_fn(h, eps, is_rms_norm, *params(weight, bias)).to(out_dtype), None
    else:  # two outputs of one xhat
        xhat = norm_fn(h, eps, is_rms_norm)
        out = affine(xhat, *params(weight, bias)).to(out_dtype)
        out1 = affine(xhat, *params(weight1, bias1)).to(out_dtype)
    residual_out = h.to(residual_dtype_for(x, residual, residual_in_fp32))
    return pack_outputs(out, out1, residual_out, keep, keep1, prenorm, return_dropout_mask)


def layer_norm_ref(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    is_rms_norm=False,
    return_dropout_mask=False,
    out_dtype=None,
    *,
    dropout_mask=None,
    dropout_mask1=None,
):
    """The signature of :func:`flash_attn.ops.layer_norm.layer_norm_fn` (less its preallocated
    ``out`` / ``residual_out``), differentiable by autograd.

    Args:
        x, x1, residual: (..., hidden), any float dtype; x1 and residual may be None.
        weight, weight1: (hidden,); bias, bias1: (hidden,) or None; weight1 None for one output.
        rowscale: x.shape[:-1] or None. Other arguments as in ``layer_norm_fn``.
        dropout_mask, dropout_mask1: bool, x's shape, True where x (x1) is kept. Drawn from
            torch's generator when dropout_p > 0 and they are None.
    Returns:
        As ``layer_norm_fn``: out (out_dtype or x's), [out1], [residual_out], [masks].
    """
    _check_keep_mask("dropout_mask", dropout_mask, "x", x)
    _check_keep_mask("dropout_mask1", dropout_mask1, "x1", x1 if x1 is not None else x)
    drawn, drawn1 = draw_keep_masks(x, x1, dropout_p)
    keep = dropout_mask if dropout_mask is not None else drawn
    keep1 = dropout_mask1 if dropout_mask1 is not None else drawn1
    return layer_norm_with(
        explicit_norm,
        keep,
        keep1,
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        zero_centered_weight,
        is_rms_norm,
        return_dropout_mask,
        out_dtype,
    )


def _check_keep_mask(name: str, mask, like_name: str, like: torch.Tensor) -> None:
    """A given keep mask must be a bool tensor of its input's shape."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be None or a bool tensor of {like_name}'s shape, got {got}")
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} must have {like_name}'s shape {tuple(like.shape)}, got {tuple(mask.shape)}"
        )


def rms_norm_ref(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    return_dropout_mask=False,
    out_dtype=None,
    *,
    dropout_mask=None,
    dropout_mask1=None,
):
    """:func:`layer_norm_ref` with ``is_rms_norm=True``."""
    return layer_norm_ref(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        zero_centered_weight,
        True,
        return_dropout_mask,
        out_dtype,
        dropout_mask=dropout_mask,
        dropout_mask1=dropout_mask1,
    )


# flash-attn 2.x's oracles (``flash_attn.ops.triton.layer_norm`` re-exports them by these names
# without the suffix): its argument order, and ``upcast``.


def layer_norm_ref_2x(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
    *,
    is_rms_norm=False,
):
    """flash-attn 2.x's ``layer_norm_ref``: :func:`layer_norm_ref` with ``upcast`` (inputs cast
    to fp32 first; out keeps x's dtype, residual_out is fp32)."""
    out_dtype = x.dtype
    if upcast:
        x, weight, bias, residual, x1, weight1, bias1 = (
            t.float() if t is not None else None
            for t in (x, weight, bias, residual, x1, weight1, bias1)
        )
    return layer_norm_ref(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        zero_centered_weight=zero_centered_weight,
        is_rms_norm=is_rms_norm,
        out_dtype=out_dtype,
        dropout_mask=dropout_mask,
        dropout_mask1=dropout_mask1,
    )


def rms_norm_ref_2x(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """:func:`layer_norm_ref_2x` for RMSNorm."""
    return layer_norm_ref_2x(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        zero_centered_weight,
        dropout_mask,
        dropout_mask1,
        upcast,
        is_rms_norm=True,
    )
