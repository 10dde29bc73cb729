"""The Triton path of cross-entropy behind autograd, two ways over the same launches (as
LayerNorm's), and the vocabulary-parallel one:

- Eager: :class:`CrossEntropyFunction`, one ``torch.autograd.Function`` whose forward (the
  reduction included) and backward call the :class:`CrossEntropyLaunches` of the call
  signature (``api.py`` keeps them in its plan).
- Under ``torch.compile``: the custom ops ``flash_attn::cross_entropy_fwd``,
  ``flash_attn::cross_entropy_bwd`` and the in-place ``flash_attn::cross_entropy_bwd_inplace``
  (fake implementations and an autograd formula), the reduction after them.
- :class:`VocabParallelCrossEntropy`: the kernels on one vocabulary shard per rank.

The first two differentiate by :func:`_logits_grad`. The kernels are imported inside each op
so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from flash_attn.ops.cross_entropy.reference import combined_lse, shard_of, summed
from flash_attn.ops.custom_op import custom_op
from flash_attn.ops.plans import PlanCache, contiguous_aligned


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


def _logits_grad(saved: tuple, dloss, inplace_backward: bool, backward):
    """The gradient of the logits, None where the loss's is (a function upstream returned
    None). saved: the forward's (logits, lse, labels); dloss: (n_rows,) gradient of the per-row
    loss; backward(dloss, logits, lse, labels, inplace) launches the backward kernel, in place
    over the logits (which are not needed after it: their storage receives the gradient) when
    inplace_backward."""
    if dloss is None:
        return None
    logits, lse, labels = saved
    return backward(dloss, logits, lse, labels, inplace_backward)


class CrossEntropyLaunches:
    """The forward and backward launches of one call signature of ``cross_entropy_loss``
    (without a process group), built from its first call's tensors (their metadata only).

    Args:
        logits: (n_rows, vocab) with a unit column stride; labels: (n_rows,) int64, contiguous.
        label_smoothing, logit_scale, lse_square_scale, ignore_index, inplace_backward: as
            ``cross_entropy_loss`` takes them.
        use_precomputed_lse: the calls pass a precomputed (n_rows,) lse, used in place of the
            computed one (see :func:`uses_precomputed_lse`).
        reduction: "mean", "sum" or "none".
        return_z_loss: the forward also returns the z-loss part, reduced alike.
    """

    def __init__(
        self,
        logits,
        labels,
        *,
        label_smoothing: float,
        logit_scale: float,
        lse_square_scale: float,
        ignore_index: int,
        inplace_backward: bool,
        use_precomputed_lse: bool,
        reduction: str,
        return_z_loss: bool,
    ):
        from flash_attn.ops.cross_entropy.triton.kernels import (
            CrossEntropyBackward,
            CrossEntropyForward,
        )

        self.kernel = CrossEntropyForward(
            logits,
            labels,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            logit_scale=logit_scale,
        )
        self.backward_kernel = CrossEntropyBackward(
            logits,
            labels,
            dloss_stride=1 if reduction == "none" else 0,  # a reduction's gradient: broadcast
            inplace=inplace_backward,
            label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale,
            ignore_index=ignore_index,
            logit_scale=logit_scale,
        )
        self.n_rows = logits.shape[0]
        self.ignore_index, self.lse_square_scale = ignore_index, lse_square_scale
        self.inplace_backward, self.use_precomputed_lse = inplace_backward, use_precomputed_lse
        self.reduction, self.return_z_loss = reduction, return_z_loss

    def forward(self, logits, labels, precomputed_lse):
        """(loss, z_loss, lse, scale): loss and z_loss reduced (z_loss None unless
        return_z_loss), lse (n_rows,) fp32, and what the reduction multiplied the per-row
        losses by: None for "none" and "sum", 1 / the number of rows not ignored for "mean" (a
        0-dim fp32 tensor, inf without such rows)."""
        label_terms, lse = self.kernel(logits, labels)
        if self.use_precomputed_lse:
            lse = precomputed_lse.to(torch.float32, copy=True)
        valid = labels != self.ignore_index
        # label_terms is this call's own buffer: the loss is summed into it.
        if self.lse_square_scale == 0.0:
            loss, z_loss = torch.where(valid, label_terms.add_(lse), 0.0), None
        else:
            z_loss = torch.where(valid, self.lse_square_scale * lse.square(), 0.0)
            loss = torch.where(valid, label_terms.add_(lse).add_(z_loss), 0.0)
        if not self.return_z_loss:
            z_loss = None
        elif z_loss is None:
            z_loss = torch.zeros_like(lse)
        if self.reduction == "none":
            return loss, z_loss, lse, None
        if self.reduction == "sum":
            return loss.sum(), None if z_loss is None else z_loss.sum(), lse, None
        # All rows ignored: 0 / 0 = nan, as F.cross_entropy gives.
        count = valid.sum(dtype=torch.float32)
        return loss.sum() / count, None if z_loss is None else z_loss.sum() / count, lse, count

    def backward(self, grad, logits, lse, labels, count):
        """dlogits (n_rows, vocab) from the gradient of the (reduced) loss: the backward kernel
        with each row's loss gradient, one value broadcast to every row for a reduction."""
        if self.reduction == "none":
            dloss = contiguous_aligned(grad)
        else:
            grad = grad / count if count is not None else contiguous_aligned(grad)
            dloss = grad.expand(self.n_rows)
        return _logits_grad(
            (logits, lse, labels), dloss, self.inplace_backward, self._launch_backward
        )

    def _launch_backward(self, dloss, logits, lse, labels, inplace):
        return self.backward_kernel(dloss, logits, lse, labels)


class _ChunkLosses:
    """The forward and in-place backward launches of :func:`chunk_losses_` at one chunk shape,
    dtype and options (built from the first chunk's tensors, their metadata only)."""

    def __init__(self, logits, labels, options: tuple, dloss_stride: int):
        from flash_attn.ops.cross_entropy.triton.kernels import (
            CrossEntropyBackward,
            CrossEntropyForward,
        )

        label_smoothing, lse_square_scale, ignore_index = options
        shared = dict(label_smoothing=label_smoothing, ignore_index=ignore_index)
        self.forward = CrossEntropyForward(logits, labels, **shared)
        self.backward = CrossEntropyBackward(
            logits,
            labels,
            dloss_stride=dloss_stride,
            inplace=True,
            lse_square_scale=lse_square_scale,
            **shared,
        )
        self.ignore_index, self.lse_square_scale = ignore_index, lse_square_scale

    def __call__(self, logits, labels, dloss):
        label_terms, lse = self.forward(logits, labels)
        if dloss is not None:
            self.backward(dloss, logits, lse, labels)
        # label_terms is this call's own buffer: the loss is summed into it.
        loss = label_terms.add_(lse)
        if self.lse_square_scale != 0.0:
            loss.add_(self.lse_square_scale * lse.square())
        return torch.where(labels == self.ignore_index, 0.0, loss)


_chunk_plans = PlanCache(256)  # per chunk shape, dtype, options and dloss stride


def chunk_losses_(logits, labels, dloss, options: tuple):
    """Per-row loss (n_rows,) fp32 of a chunk of logits (n_rows, vocab), contiguous, fresh (as
    a matmul returns them), with the gradient dloss * dloss_row/dx written over them when
    dloss (n_rows,) fp32, any stride (0: one value for every row), is given. options:
    (label_smoothing, lse_square_scale, ignore_index); labels (n_rows,) int64, contiguous.
    The launches are kept per chunk shape, dtype and options; under ``torch.compile``, the
    custom ops."""
    label_smoothing, lse_square_scale, ignore_index = options
    if torch.compiler.is_compiling():
        kernel_options = (label_smoothing, 1.0, lse_square_scale, ignore_index)  # logit_scale 1
        loss, _, lse = cross_entropy_fwd_op(logits, labels, None, *kernel_options, True)
        if dloss is not None:
            cross_entropy_bwd_inplace_op(dloss, logits, lse, labels, *kernel_options)
        return loss
    labels = contiguous_aligned(labels)  # a slice of the labels: aligned or copied
    dloss_stride = None
    if dloss is not None:
        dloss_stride = dloss.stride(0)
        if dloss_stride != 0:
            dloss = contiguous_aligned(dloss)
            dloss_stride = 1
    key = (logits.shape, logits.dtype, logits.device, options, dloss_stride)
    plan = _chunk_plans.get(key)
    if plan is None:
        plan = _chunk_plans.keep(key, _ChunkLosses(logits, labels, options, dloss_stride or 0))
    return plan(logits, labels, dloss)


class CrossEntropyFunction(torch.autograd.Function):
    """loss = CrossEntropyFunction.apply(logits, labels, precomputed_lse, launches), or
    (loss, z_loss) where ``launches`` (a :class:`CrossEntropyLaunches`) returns the z-loss:
    its forward, reduced; the gradient flows to the logits."""

    @staticmethod
    def forward(ctx, logits, labels, precomputed_lse, launches):
        loss, z_loss, lse, count = launches.forward(logits, labels, precomputed_lse)
        ctx.save_for_backward(logits, lse, labels)
        ctx.launches, ctx.count = launches, count
        if z_loss is None:
            return loss
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad, *_):
        logits, lse, labels = ctx.saved_tensors
        return ctx.launches.backward(grad, logits, lse, labels, ctx.count), None, None, None


# ---------------------------------------------------------------------------------------------
# torch.library ops, for torch.compile


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
    def backward(dloss, logits, lse, labels, inplace):
        if not inplace:
            return cross_entropy_bwd_op(dloss, logits, lse, labels, *ctx.options)
        cross_entropy_bwd_inplace_op(dloss, logits, lse, labels, *ctx.options)
        return logits

    dlogits = _logits_grad(ctx.saved_tensors, dloss, ctx.inplace_backward, backward)
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
