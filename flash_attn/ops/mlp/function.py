"""The Triton path of linear + activation behind autograd: the custom ops
``flash_attn::linear_act_fwd`` (the activation in the matmul's epilogue, optionally storing the
pre-activation) and ``flash_attn::linear_act_bwd`` (the activation's derivative), with fake
implementations and an autograd formula (the two matmuls of the backward are cuBLAS's).

The kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flash_attn.ops.custom_op import custom_op


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

    out, pre = linear_act_fwd(_rows(x), weight, bias, activation, gated, store_pre)
    return (out.view(*x.shape[:-1], out.shape[-1]) if x.ndim != 2 else out), pre


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K)."""
    return t.reshape(-1, t.shape[-1]) if t.ndim != 2 else t


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

    return linear_act_bwd(_rows(dout), pre, activation, gated)


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
    x, weight, pre = ctx.saved_tensors
    dpre = linear_act_bwd_op(dout, pre, ctx.activation, ctx.gated)
    dx = (dpre @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
    dweight = dpre.t() @ _rows(x) if ctx.needs_input_grad[1] else None
    dbias = dpre.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None, None


linear_act_fwd_op.register_autograd(_backward, setup_context=_setup_context)
