"""The Triton path of linear + activation behind autograd, two ways over the same launches (as
attention's and the norms'):

- Eager: :class:`LinearActFunction`, one ``torch.autograd.Function`` whose forward and backward
  call the :class:`LinearActLaunches` of the call signature (``api.py`` keeps them in its plan).
- Under ``torch.compile``: the custom ops ``flash_attn::linear_act_fwd`` (the activation in the
  matmul's epilogue, optionally storing the pre-activation) and ``flash_attn::linear_act_bwd``
  (the activation's derivative), with fake implementations and an autograd formula.

Both differentiate by :func:`_input_grads` (the two matmuls of the backward are cuBLAS's). The
kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flash_attn.ops.custom_op import custom_op


def _input_grads(saved: tuple, dpre, has_bias: bool, needs_input_grad) -> tuple:
    """(dx, dweight, dbias) from the pre-activation's gradient dpre (M, N) or (M, 2N); None
    where an input needs none. saved: the forward's (x, weight, pre)."""
    x, weight, _ = saved
    dx = (dpre @ weight).view(x.shape) if needs_input_grad[0] else None
    dweight = dpre.t() @ x.reshape(-1, x.shape[-1]) if needs_input_grad[1] else None
    dbias = dpre.sum(0) if has_bias and needs_input_grad[2] else None
    return dx, dweight, dbias


class LinearActLaunches:
    """The forward (storing the pre-activation) and backward launches of one call signature of
    ``linear_activation`` / ``gated_linear`` with gradients, built from its first call's
    tensors (their metadata only)."""

    def __init__(self, x, weight, bias, *, activation: str, gated: bool):
        from flash_attn.ops.mlp.triton.kernels import LinearActForward

        self.activation, self.gated = activation, gated
        self.forward = LinearActForward(
            x, weight, bias, activation=activation, gated=gated, store_pre=True
        )
        self._backward = None

    def backward(self, dout, pre):
        """dpre from dout (``ActBackward``'s call), built on first use."""
        if self._backward is None:
            from flash_attn.ops.mlp.triton.kernels import ActBackward

            self._backward = ActBackward(pre, activation=self.activation, gated=self.gated)
        return self._backward(dout, pre)


class LinearActFunction(torch.autograd.Function):
    """out = LinearActFunction.apply(x, weight, bias, launches): the forward of ``launches`` (a
    :class:`LinearActLaunches`); gradients flow to x, weight and bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, launches):
        out, pre = launches.forward(x, weight, bias)
        ctx.save_for_backward(x, weight, pre)
        ctx.launches, ctx.has_bias = launches, bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        dpre = ctx.launches.backward(dout, saved[2])
        return *_input_grads(saved, dpre, ctx.has_bias, ctx.needs_input_grad), None


# ---------------------------------------------------------------------------------------------
# torch.library ops, for torch.compile


@custom_op("flash_attn::linear_act_fwd")
def linear_act_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    store_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> out (..., N), pre (M, N) or, gated, (M, 2N) for the M rows of x; pre is
    (0,) without store_pre."""
    from flash_attn.ops.mlp.triton.kernels import linear_act_fwd

    return linear_act_fwd(x, weight, bias, activation, gated, store_pre)


@linear_act_fwd_op.register_fake
def _(x, weight, bias, activation, gated, store_pre):
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    rows = math.prod(x.shape[:-1])
    out = x.new_empty((*x.shape[:-1], n_out))
    pre = x.new_empty((rows, weight.shape[0]) if store_pre else (0,))
    return out, pre


@custom_op("flash_attn::linear_act_bwd")
def linear_act_bwd_op(
    dout: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    """dout (..., N) -> dpre like pre (M, N) or (M, 2N)."""
    from flash_attn.ops.mlp.triton.kernels import linear_act_bwd

    return linear_act_bwd(dout, pre, activation, gated)


@linear_act_bwd_op.register_fake
def _(dout, pre, activation, gated):
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, gated, store_pre = inputs
    _, pre = output
    ctx.save_for_backward(x, weight, pre)
    ctx.has_bias = bias is not None
    ctx.activation, ctx.gated, ctx.store_pre = activation, gated, store_pre
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates


def _backward(ctx, dout, _dpre):
    if not ctx.store_pre:
        raise RuntimeError(
            "linear_activation ran without storing its pre-activation (no input required grad "
            "or grad mode was off), so it cannot be differentiated"
        )
    if dout is None:  # the output's gradient is undefined (a function upstream returned None)
        return (None,) * 6
    saved = ctx.saved_tensors
    dpre = linear_act_bwd_op(dout, saved[2], ctx.activation, ctx.gated)
    return *_input_grads(saved, dpre, ctx.has_bias, ctx.needs_input_grad), None, None, None


linear_act_fwd_op.register_autograd(_backward, setup_context=_setup_context)
