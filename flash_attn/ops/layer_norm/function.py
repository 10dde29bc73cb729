"""The Triton path of LayerNorm / RMSNorm behind autograd: the custom ops
``flash_attn::layer_norm_fwd`` and ``flash_attn::layer_norm_bwd`` (fake implementations give
the output shapes, so ``torch.compile`` traces them) and the autograd formula that joins them.

The kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flash_attn.ops.custom_op import custom_op


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(..., N) -> (M, N): the rows the kernels normalise."""
    return t.reshape(-1, t.shape[-1]) if t is not None and t.ndim != 2 else t


def _shaped(t: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A kernel's (M, N) output viewed in the caller's shape."""
    return t.view(shape) if t is not None and len(shape) != 2 else t


def _empty_if_none(t: torch.Tensor | None, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Custom ops cannot return None: an empty tensor stands for a missing output."""
    return t if t is not None else like.new_empty(0, dtype=dtype or like.dtype)


@custom_op("flash_attn::layer_norm_fwd")
def layer_norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    x1: Optional[torch.Tensor],
    weight1: Optional[torch.Tensor],
    bias1: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    eps: float,
    dropout_p: float,
    is_rms_norm: bool,
    zero_centered_weight: bool,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype,
    store_residual_out: bool,
    store_dropout_mask: bool,
    prenorm: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """x, x1, residual (..., N) -> y, y1 x's shape or (0,), residual_out x's shape or (0,),
    mean (M,), rstd (M,) (M rows of N), keep, keep1 x's shape, bool, or (0,). rowscale:
    x.shape[:-1] or None."""
    from flash_attn.ops.layer_norm.triton.kernels import layer_norm_fwd

    shape = x.shape
    y, y1, residual_out, mean, rstd, keep, keep1 = layer_norm_fwd(
        _rows(x),
        weight,
        bias,
        eps,
        _rows(residual),
        _rows(x1),
        weight1,
        bias1,
        dropout_p,
        seed,
        rowscale.reshape(-1) if rowscale is not None else None,
        zero_centered_weight,
        is_rms_norm,
        out_dtype,
        residual_dtype,
        store_residual_out,
        store_dropout_mask,
    )
    return (
        _shaped(y, shape),
        _empty_if_none(_shaped(y1, shape), y),
        _empty_if_none(_shaped(residual_out, shape), x, residual_dtype),
        mean,
        rstd,
        _empty_if_none(_shaped(keep, shape), x, torch.bool),
        _empty_if_none(_shaped(keep1, shape), x, torch.bool),
    )


@layer_norm_fwd_op.register_fake
def _(
    x,
    weight,
    bias,
    residual,
    x1,
    weight1,
    bias1,
    rowscale,
    seed,
    eps,
    dropout_p,
    is_rms_norm,
    zero_centered_weight,
    out_dtype,
    residual_dtype,
    store_residual_out,
    store_dropout_mask,
    prenorm,
):
    def maybe(present, dtype):
        return x.new_empty(x.shape if present else (0,), dtype=dtype)

    stats = x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)
    return (
        maybe(True, out_dtype),
        maybe(weight1 is not None, out_dtype),
        maybe(store_residual_out, residual_dtype),
        stats,
        torch.empty_like(stats),
        maybe(store_dropout_mask, torch.bool),
        maybe(store_dropout_mask and x1 is not None, torch.bool),
    )


@custom_op("flash_attn::layer_norm_bwd")
def layer_norm_bwd_op(
    dy: torch.Tensor,
    dy1: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    weight1: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    is_rms_norm: bool,
    zero_centered_weight: bool,
    x_dtype: torch.dtype,
    x1_dtype: Optional[torch.dtype],
    residual_dtype: Optional[torch.dtype],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """dy, dy1, x, dresidual_out (..., N) -> dx x's shape, dweight (N,), dbias (N,), dresidual,
    dx1 x's shape, dweight1 (N,), dbias1 (N,); the last four (0,) where the forward had no
    such input."""
    from flash_attn.ops.layer_norm.triton.kernels import layer_norm_bwd

    shape = x.shape
    dx, dweight, dbias, dresidual, dx1, dweight1, dbias1 = layer_norm_bwd(
        _rows(dy),
        _rows(x),
        weight,
        mean,
        rstd,
        _rows(dresidual_out),
        _rows(dy1),
        weight1,
        dropout_p,
        seed,
        rowscale.reshape(-1) if rowscale is not None else None,
        zero_centered_weight,
        is_rms_norm,
        x_dtype,
        x1_dtype,
        residual_dtype,
    )
    return (
        _shaped(dx, shape),
        dweight,
        dbias,
        _empty_if_none(_shaped(dresidual, shape), dy),
        _empty_if_none(_shaped(dx1, shape), dy),
        _empty_if_none(dweight1, weight),
        _empty_if_none(dbias1, weight),
    )


@layer_norm_bwd_op.register_fake
def _(
    dy,
    dy1,
    x,
    weight,
    weight1,
    mean,
    rstd,
    dresidual_out,
    rowscale,
    seed,
    dropout_p,
    is_rms_norm,
    zero_centered_weight,
    x_dtype,
    x1_dtype,
    residual_dtype,
):
    def maybe(like, dtype):
        return like.new_empty(like.shape if dtype is not None else (0,), dtype=dtype)

    w1_dtype = weight1.dtype if weight1 is not None else None
    return (
        dy.new_empty(dy.shape, dtype=x_dtype),
        torch.empty_like(weight),
        torch.empty_like(weight),
        maybe(dy, residual_dtype),
        maybe(dy, x1_dtype),
        maybe(weight, w1_dtype),
        maybe(weight, w1_dtype),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, x1, weight1, bias1, rowscale, seed, _, dropout_p, *flags = inputs
    is_rms_norm, zero_centered_weight, out_dtype, _, store, _, prenorm = flags
    _, _, residual_out, mean, rstd, keep, keep1 = output
    # The backward needs the normalised input h: residual_out when it was written, else x.
    ctx.save_for_backward(residual_out if store else x, weight, weight1, mean, rstd, rowscale, seed)
    ctx.mark_non_differentiable(mean, rstd, keep, keep1)
    ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates
    ctx.out_dtype = out_dtype
    ctx.has_bias, ctx.has_bias1 = bias is not None, bias1 is not None
    ctx.x_dtype = x.dtype
    ctx.x1_dtype = x1.dtype if x1 is not None else None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.dropout_p, ctx.is_rms_norm, ctx.zero_centered_weight = dropout_p, is_rms_norm, flags[1]
    ctx.prenorm = prenorm


def _backward(ctx, dy, dy1, dresidual_out, *_):
    h, weight, weight1, mean, rstd, rowscale, seed = ctx.saved_tensors
    if dy is None:  # out was not differentiated (only residual_out or out1 were)
        dy = torch.zeros_like(h, dtype=ctx.out_dtype)
    if weight1 is not None and dy1 is None:
        dy1 = torch.zeros_like(h, dtype=ctx.out_dtype)
    dx, dweight, dbias, dresidual, dx1, dweight1, dbias1 = layer_norm_bwd_op(
        dy,
        dy1 if weight1 is not None else None,
        h,
        weight,
        weight1,
        mean,
        rstd,
        dresidual_out if ctx.prenorm else None,
        rowscale,
        seed,
        ctx.dropout_p,
        ctx.is_rms_norm,
        ctx.zero_centered_weight,
        ctx.x_dtype,
        ctx.x1_dtype,
        ctx.residual_dtype,
    )
    return (
        dx,
        dweight,
        dbias if ctx.has_bias else None,
        dresidual if ctx.residual_dtype is not None else None,
        dx1 if ctx.x1_dtype is not None else None,
        dweight1 if weight1 is not None else None,
        dbias1 if ctx.has_bias1 else None,
    ) + (None,) * 11


layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)
