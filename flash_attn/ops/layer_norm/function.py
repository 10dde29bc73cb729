"""The Triton path of LayerNorm / RMSNorm behind autograd, two ways over the same launches (as
attention's):

- Eager: :class:`NormFunction`, one ``torch.autograd.Function`` whose forward and backward call
  the :class:`NormLaunches` of the call signature (``api.py`` keeps them in its plan).
- Under ``torch.compile``: the custom ops ``flash_attn::layer_norm_fwd`` and
  ``flash_attn::layer_norm_bwd``, whose fake implementations give the output shapes, with an
  autograd formula.

Both keep what the backward needs in a :class:`NormGradInfo` and differentiate by
:func:`_input_grads`. The kernels are imported inside each op so that ``import flash_attn``
works without Triton.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from flash_attn.ops.custom_op import custom_op


class NormGradInfo(NamedTuple):
    """What the backward reads of the forward besides its saved tensors."""

    out_dtype: torch.dtype
    x_dtype: torch.dtype
    x1_dtype: torch.dtype | None  # None without x1
    residual_dtype: torch.dtype | None  # None without a residual
    has_bias: bool
    has_bias1: bool
    dropout_p: float
    is_rms_norm: bool
    zero_centered_weight: bool
    prenorm: bool  # residual_out is an output, with a gradient of its own


def _grad_info(x, bias, residual, x1, bias1, dropout_p, flags) -> NormGradInfo:
    """The :class:`NormGradInfo` of a forward: its inputs and the flags is_rms_norm,
    zero_centered_weight, out_dtype, prenorm."""
    is_rms_norm, zero_centered_weight, out_dtype, prenorm = flags
    return NormGradInfo(
        out_dtype=out_dtype,
        x_dtype=x.dtype,
        x1_dtype=x1.dtype if x1 is not None else None,
        residual_dtype=residual.dtype if residual is not None else None,
        has_bias=bias is not None,
        has_bias1=bias1 is not None,
        dropout_p=dropout_p,
        is_rms_norm=is_rms_norm,
        zero_centered_weight=zero_centered_weight,
        prenorm=prenorm,
    )


def _input_grads(info: NormGradInfo, saved: tuple, dy, dy1, dresidual_out, backward) -> tuple:
    """The gradients of (x, weight, bias, residual, x1, weight1, bias1), None where there is no
    such input. saved: the forward's (h, weight, weight1, mean, rstd, rowscale, seed);
    backward: the launches, called as :class:`~flash_attn.ops.layer_norm.triton.kernels.
    NormBackward` is."""
    h, weight, weight1, mean, rstd, rowscale, seed = saved
    if dy is None:  # out was not differentiated (only residual_out or out1 were)
        dy = torch.zeros_like(h, dtype=info.out_dtype)
    if weight1 is not None and dy1 is None:
        dy1 = torch.zeros_like(h, dtype=info.out_dtype)
    dx, dweight, dbias, dresidual, dx1, dweight1, dbias1 = backward(
        dy,
        dy1 if weight1 is not None else None,
        h,
        weight,
        weight1,
        mean,
        rstd,
        dresidual_out if info.prenorm else None,
        rowscale,
        seed,
    )
    return (
        dx,
        dweight,
        dbias if info.has_bias else None,
        dresidual if info.residual_dtype is not None else None,
        dx1 if info.x1_dtype is not None else None,
        dweight1 if weight1 is not None else None,
        dbias1 if info.has_bias1 else None,
    )


class NormLaunches:
    """The forward and backward launches of one call signature of ``layer_norm_fn``, built from
    its first call's tensors (their metadata only): ``forward`` is a ``NormForward``,
    ``backward`` runs a ``NormBackward``.

    Args: the nine tensors of :class:`NormFunction`, ``prenorm``, and ``NormForward``'s
    options (eps, dropout_p, is_rms_norm, zero_centered_weight, out_dtype, residual_dtype,
    store_residual_out, store_dropout_mask).
    """

    def __init__(
        self, x, weight, bias, residual, x1, weight1, bias1, rowscale, seed, *, prenorm, **options
    ):
        from flash_attn.ops.layer_norm.triton.kernels import NormForward

        self.forward = NormForward(
            x, weight, bias, residual, x1, weight1, bias1, rowscale, seed, **options
        )
        flags = (options["is_rms_norm"], options["zero_centered_weight"])
        flags += (self.forward.out_dtype, prenorm)
        self.info = _grad_info(x, bias, residual, x1, bias1, options["dropout_p"], flags)
        self.has_rowscale = rowscale is not None
        self.store = options["store_residual_out"]
        self._backward = {}

    def backward(self, dy, dy1, h, weight, weight1, mean, rstd, dresidual_out, rowscale, seed):
        """The backward launches (``NormBackward``'s call), built on first use with or without
        the gradient of residual_out (prenorm, where residual_out was differentiated)."""
        has_dresidual_out = dresidual_out is not None
        launch = self._backward.get(has_dresidual_out)
        if launch is None:
            from flash_attn.ops.layer_norm.triton.kernels import NormBackward

            info = self.info
            launch = self._backward[has_dresidual_out] = NormBackward(
                h,
                weight,
                weight1,
                has_dresidual_out=has_dresidual_out,
                has_rowscale=self.has_rowscale,
                dropout_p=info.dropout_p,
                zero_centered_weight=info.zero_centered_weight,
                is_rms_norm=info.is_rms_norm,
                x_dtype=info.x_dtype,
                x1_dtype=info.x1_dtype,
                residual_dtype=info.residual_dtype,
                share_dx=True,  # autograd takes one tensor as two inputs' gradient
            )
        return launch(dy, dy1, h, weight, weight1, mean, rstd, dresidual_out, rowscale, seed)


class NormFunction(torch.autograd.Function):
    """y, y1, residual_out, keep, keep1 = NormFunction.apply(x, weight, bias, residual, x1,
    weight1, bias1, rowscale, seed, launches): the forward of ``launches`` (a
    :class:`NormLaunches`), outputs as it returns them, None where not stored; gradients flow to
    the seven inputs before rowscale."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, x1, weight1, bias1, rowscale, seed, launches):
        y, y1, residual_out, mean, rstd, keep, keep1 = launches.forward(
            x, weight, bias, residual, x1, weight1, bias1, rowscale, seed
        )
        if keep is not None:
            ctx.mark_non_differentiable(*(t for t in (keep, keep1) if t is not None))
        ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates
        h = residual_out if launches.store else x
        ctx.save_for_backward(h, weight, weight1, mean, rstd, rowscale, seed)
        ctx.launches = launches
        return y, y1, residual_out, keep, keep1

    @staticmethod
    def backward(ctx, dy, dy1, dresidual_out, _dkeep, _dkeep1):
        launches = ctx.launches
        grads = _input_grads(
            launches.info, ctx.saved_tensors, dy, dy1, dresidual_out, launches.backward
        )
        return grads + (None,) * 3


# ---------------------------------------------------------------------------------------------
# torch.library ops, for torch.compile


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

    y, y1, residual_out, mean, rstd, keep, keep1 = layer_norm_fwd(
        x,
        weight,
        bias,
        eps,
        residual,
        x1,
        weight1,
        bias1,
        dropout_p,
        seed,
        rowscale,
        zero_centered_weight,
        is_rms_norm,
        out_dtype,
        residual_dtype,
        store_residual_out,
        store_dropout_mask,
    )
    return (
        y,
        _empty_if_none(y1, y),
        _empty_if_none(residual_out, x, residual_dtype),
        mean,
        rstd,
        _empty_if_none(keep, x, torch.bool),
        _empty_if_none(keep1, x, torch.bool),
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

    dx, dweight, dbias, dresidual, dx1, dweight1, dbias1 = layer_norm_bwd(
        dy,
        x,
        weight,
        mean,
        rstd,
        dresidual_out,
        dy1,
        weight1,
        dropout_p,
        seed,
        rowscale,
        zero_centered_weight,
        is_rms_norm,
        x_dtype,
        x1_dtype,
        residual_dtype,
    )
    return (
        dx,
        dweight,
        dbias,
        _empty_if_none(dresidual, dy),
        _empty_if_none(dx1, dy),
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
    flags = (is_rms_norm, zero_centered_weight, out_dtype, prenorm)
    ctx.info = _grad_info(x, bias, residual, x1, bias1, dropout_p, flags)


def _backward(ctx, dy, dy1, dresidual_out, *_):
    info = ctx.info

    def backward(*tensors):  # the launches' ten tensors, then the options
        return layer_norm_bwd_op(
            *tensors,
            info.dropout_p,
            info.is_rms_norm,
            info.zero_centered_weight,
            info.x_dtype,
            info.x1_dtype,
            info.residual_dtype,
        )

    grads = _input_grads(info, ctx.saved_tensors, dy, dy1, dresidual_out, backward)
    return grads + (None,) * 11


layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)
