"""The Triton path of cross-entropy behind autograd: the custom ops
``flash_attn::cross_entropy_fwd``, ``flash_attn::cross_entropy_bwd`` and the in-place
``flash_attn::cross_entropy_bwd_inplace`` (fake implementations and an autograd formula, so
``torch.compile`` traces them), and :class:`VocabParallelCrossEntropy`, the kernels on one
vocabulary shard per rank.

The kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from flash_attn.ops.cross_entropy.reference import combined_lse, shard_of, summed
from flash_attn.ops.custom_op import custom_op


def uses_precomputed_lse(precomputed_lse, logit_scale: float, label_smoothing: float) -> bool:
    """flash-attn 2.x takes a precomputed lse only without a logit scale and label smoothing."""
    return precomputed_lse is not None and logit_scale == 1.0 and label_smoothing == 0.0


def _loss_and_z_loss(label_terms, lse, labels, lse_square_scale, ignore_index):
    """Per-row (loss, z_loss) fp32 from a row's label terms and its (whole-vocabulary) lse."""
    ignored = labels == ignore_index
    if lse_square_scale == 0.0:
        return torch.where(ignored, 0.0, label_terms + lse), torch.zeros_like(lse)
    z_loss = torch.where(ignored, 0.0, lse_square_scale * lse.square())
    return torch.where(ignored, 0.0, label_terms + lse + z_loss), z_loss


@custom_op("flash_attn::cross_entropy_fwd")
def cross_entropy_fwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: Optional[torch.Tensor],
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    ignore_index: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> per-row loss, z_loss and lse, each (n_rows,) fp32."""
    from flash_attn.ops.cross_entropy.triton.kernels import cross_entropy_fwd

    label_terms, lse = cross_entropy_fwd(logits, labels, label_smoothing, ignore_index, logit_scale)
    if uses_precomputed_lse(precomputed_lse, logit_scale, label_smoothing):
        lse = precomputed_lse.to(torch.float32, copy=True)  # an output may not alias an input
    loss, z_loss = _loss_and_z_loss(label_terms, lse, labels, lse_square_scale, ignore_index)
    return loss, z_loss, lse


@cross_entropy_fwd_op.register_fake
def _(
    logits,
    labels,
    precomputed_lse,
    label_smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    inplace_backward,
):
    row = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return row, torch.empty_like(row), torch.empty_like(row)


# Both backward ops take: dloss, logits, lse, labels, label_smoothing, logit_scale,
# lse_square_scale, ignore_index; the in-place one writes the gradient over the logits.
@custom_op("flash_attn::cross_entropy_bwd")
def cross_entropy_bwd_op(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    ignore_index: int,
) -> torch.Tensor:
    from flash_attn.ops.cross_entropy.triton.kernels import cross_entropy_bwd

    return cross_entropy_bwd(
        dloss,
        logits,
        lse,
        labels,
        label_smoothing,
        lse_square_scale,
        ignore_index,
        logit_scale=logit_scale,
    )


@cross_entropy_bwd_op.register_fake
def _(dloss, logits, lse, labels, label_smoothing, logit_scale, lse_square_scale, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("flash_attn::cross_entropy_bwd_inplace", mutates_args=("logits",))
def cross_entropy_bwd_inplace_op(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    ignore_index: int,
) -> None:
    from flash_attn.ops.cross_entropy.triton.kernels import cross_entropy_bwd

    cross_entropy_bwd(
        dloss,
        logits,
        lse,
        labels,
        label_smoothing,
        lse_square_scale,
        ignore_index,
        logits,
        logit_scale=logit_scale,
    )


def _setup_context(ctx, inputs, output):
    logits, labels, _, label_smoothing, logit_scale, lse_square_scale, ignore_index, inplace = (
        inputs
    )
    _, z_loss, lse = output
    ctx.save_for_backward(logits, lse, labels)
    ctx.options = (label_smoothing, logit_scale, lse_square_scale, ignore_index)
    ctx.inplace_backward = inplace
    ctx.mark_non_differentiable(z_loss, lse)
    ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates


def _backward(ctx, dloss, _dz_loss, _dlse):
    if dloss is None:  # the loss's gradient is undefined (a function upstream returned None)
        return (None,) * 8
    logits, lse, labels = ctx.saved_tensors
    if ctx.inplace_backward:
        # The logits are not needed after this: their storage receives the gradient.
        cross_entropy_bwd_inplace_op(dloss, logits, lse, labels, *ctx.options)
        dlogits = logits
    else:
        dlogits = cross_entropy_bwd_op(dloss, logits, lse, labels, *ctx.options)
    return dlogits, None, None, None, None, None, None, None


cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """The kernels on one vocabulary shard per rank: lse and the label terms are combined
    across process_group in the forward; the backward needs no communication."""

    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        precomputed_lse,
        label_smoothing,
        logit_scale,
        lse_square_scale,
        ignore_index,
        inplace_backward,
        process_group,
    ):
        from flash_attn.ops.cross_entropy.triton.kernels import cross_entropy_fwd

        class_start, total_classes = shard_of(logits, process_group)
        label_terms, lse = cross_entropy_fwd(
            logits, labels, label_smoothing, ignore_index, logit_scale, class_start, total_classes
        )
        if uses_precomputed_lse(precomputed_lse, logit_scale, label_smoothing):
            lse = precomputed_lse.to(torch.float32)
        lse = combined_lse(lse, process_group)
        label_terms = summed(label_terms, process_group)
        loss, z_loss = _loss_and_z_loss(label_terms, lse, labels, lse_square_scale, ignore_index)
        ctx.save_for_backward(logits, lse, labels)
        ctx.options = (label_smoothing, lse_square_scale, ignore_index)
        ctx.shard = (logit_scale, class_start, total_classes)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, dloss, _dz_loss):
        from flash_attn.ops.cross_entropy.triton.kernels import cross_entropy_bwd

        logits, lse, labels = ctx.saved_tensors
        dlogits = cross_entropy_bwd(
            dloss,
            logits,
            lse,
            labels,
            *ctx.options,
            logits if ctx.inplace_backward else None,
            *ctx.shard,
        )
        return (dlogits,) + (None,) * 8
