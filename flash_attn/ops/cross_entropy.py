"""Fused cross-entropy: custom ops over the Triton kernels, functional API and module.

``cross_entropy_loss`` computes what ``F.cross_entropy`` computes with the same ``ignore_index``,
``label_smoothing`` and ``reduction``, plus the z-loss ``lse_square_scale * lse**2``. The Triton
path never materialises the softmax: the forward keeps one fp32 log-sum-exp per row, the backward
recomputes the probabilities from it, and with ``inplace_backward=True`` writes the gradient over
the logits, so a (tokens, vocab) loss costs one logits-sized buffer instead of three.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flash_attn.ops.backend import reads_values, resolve_backend
from flash_attn.ops.custom_op import custom_op
from flash_attn.ops.reference.cross_entropy import (
    REDUCTIONS,
    combined_lse,
    cross_entropy_ref,
    reduce_loss,
    shard_of,
    summed,
)
from flash_attn.utils.checks import check_float

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_precomputed_lse(precomputed_lse, logit_scale: float, label_smoothing: float) -> bool:
    """flash-attn 2.x takes a precomputed lse only without a logit scale and label smoothing."""
    return precomputed_lse is not None and logit_scale == 1.0 and label_smoothing == 0.0


def _loss_and_z_loss(label_terms, lse, labels, lse_square_scale, ignore_index):
    """Per-row (loss, z_loss) fp32 from a row's label terms and its (whole-vocabulary) lse."""
    ignored = labels == ignore_index
    z_loss = torch.where(ignored, 0.0, lse_square_scale * lse.square())
    return torch.where(ignored, 0.0, label_terms + lse + z_loss), z_loss


# The Triton module is imported inside each op so that ``import flash_attn`` works without Triton.
@custom_op("flash_attn::cross_entropy_fwd")
def _cross_entropy_fwd_op(
    logits: torch.Tensor, labels: torch.Tensor, precomputed_lse: Optional[torch.Tensor],
    label_smoothing: float, logit_scale: float, lse_square_scale: float, ignore_index: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> per-row loss, z_loss and lse, each (n_rows,) fp32."""
    from flash_attn.ops.kernels.cross_entropy import cross_entropy_fwd

    label_terms, lse = cross_entropy_fwd(logits, labels, label_smoothing, ignore_index, logit_scale)
    if uses_precomputed_lse(precomputed_lse, logit_scale, label_smoothing):
        lse = precomputed_lse.to(torch.float32, copy=True)  # an output may not alias an input
    loss, z_loss = _loss_and_z_loss(label_terms, lse, labels, lse_square_scale, ignore_index)
    return loss, z_loss, lse


@_cross_entropy_fwd_op.register_fake
def _(logits, labels, precomputed_lse, label_smoothing, logit_scale, lse_square_scale,
      ignore_index, inplace_backward):  # fmt: skip
    row = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return row, torch.empty_like(row), torch.empty_like(row)


# Both backward ops take: dloss, logits, lse, labels, label_smoothing, logit_scale,
# lse_square_scale, ignore_index; the in-place one writes the gradient over the logits.
@custom_op("flash_attn::cross_entropy_bwd")
def _cross_entropy_bwd_op(
    dloss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
    label_smoothing: float, logit_scale: float, lse_square_scale: float, ignore_index: int,
) -> torch.Tensor:  # fmt: skip
    from flash_attn.ops.kernels.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(
        dloss, logits, lse, labels, label_smoothing, lse_square_scale, ignore_index,
        logit_scale=logit_scale,
    )  # fmt: skip


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, lse, labels, label_smoothing, logit_scale, lse_square_scale, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("flash_attn::cross_entropy_bwd_inplace", mutates_args=("logits",))
def _cross_entropy_bwd_inplace_op(
    dloss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
    label_smoothing: float, logit_scale: float, lse_square_scale: float, ignore_index: int,
) -> None:  # fmt: skip
    from flash_attn.ops.kernels.cross_entropy import cross_entropy_bwd

    cross_entropy_bwd(
        dloss, logits, lse, labels, label_smoothing, lse_square_scale, ignore_index, logits,
        logit_scale=logit_scale,
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    logits, labels, _, label_smoothing, logit_scale, lse_square_scale, ignore_index, inplace = (
        inputs
    )
    _, z_loss, lse = output
    ctx.save_for_backward(logits, lse, labels)
    ctx.options = (label_smoothing, logit_scale, lse_square_scale, ignore_index)
    ctx.inplace_backward = inplace
    ctx.mark_non_differentiable(z_loss, lse)


def _backward(ctx, dloss, _dz_loss, _dlse):
    logits, lse, labels = ctx.saved_tensors
    if ctx.inplace_backward:
        # The logits are not needed after this: their storage receives the gradient.
        torch.ops.flash_attn.cross_entropy_bwd_inplace(dloss, logits, lse, labels, *ctx.options)
        dlogits = logits
    else:
        dlogits = _cross_entropy_bwd_op(dloss, logits, lse, labels, *ctx.options)
    return dlogits, None, None, None, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The kernels on one vocabulary shard per rank: lse and the label terms are combined
    across process_group in the forward; the backward needs no communication."""

    @staticmethod
    def forward(ctx, logits, labels, precomputed_lse, label_smoothing, logit_scale,
                lse_square_scale, ignore_index, inplace_backward, process_group):  # fmt: skip
        from flash_attn.ops.kernels.cross_entropy import cross_entropy_fwd

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
        from flash_attn.ops.kernels.cross_entropy import cross_entropy_bwd

        logits, lse, labels = ctx.saved_tensors
        dlogits = cross_entropy_bwd(
            dloss, logits, lse, labels, *ctx.options, logits if ctx.inplace_backward else None,
            *ctx.shard,
        )  # fmt: skip
        return (dlogits,) + (None,) * 8


def check_cross_entropy_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    lse_square_scale: float,
    logits_name: str = "logits",
) -> None:
    """Validate the arguments shared by the cross-entropy and linear cross-entropy APIs.

    Raises:
        TypeError: a non-float ``logits_name`` tensor or non-integer labels.
        ValueError: shapes that disagree, an unknown reduction, label smoothing outside
            [0, 1], a negative lse_square_scale, or a label outside [0, vocab) that is not
            ignore_index.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {got}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (n_rows,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} rows but {logits_name} has {logits.shape[0]} "
            f"(labels {tuple(labels.shape)}, {logits_name} {tuple(logits.shape)})"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but {logits_name} is on {logits.device}")
    check_reduction(reduction)
    check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_float("lse_square_scale", lse_square_scale, low=0.0)


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError when a label is outside [0, vocab) and is not ignore_index.

    This reads the labels on the host: only where that costs no device synchronisation (see
    :func:`flash_attn.ops.backend.reads_values`), never while torch.compile traces.
    """
    if labels.numel() == 0 or not reads_values(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} out of range)"
        )


def _check_loss_options(logits, logit_scale, precomputed_lse, process_group) -> None:
    check_float("logit_scale", logit_scale, low=0.0, low_open=True)
    if precomputed_lse is not None and (
        not isinstance(precomputed_lse, torch.Tensor) or precomputed_lse.shape != logits.shape[:1]
    ):
        got = getattr(precomputed_lse, "shape", type(precomputed_lse).__name__)
        raise ValueError(f"precomputed_lse must be None or ({logits.shape[0]},), got {got}")
    if precomputed_lse is not None and not precomputed_lse.is_floating_point():
        raise TypeError(
            f"precomputed_lse must be a floating-point (fp32) tensor, got {precomputed_lse.dtype}"
        )
    if precomputed_lse is not None and precomputed_lse.device != logits.device:
        raise ValueError(
            f"precomputed_lse is on {precomputed_lse.device} but logits is on {logits.device}"
        )
    if process_group is not None and not (
        dist.is_available() and isinstance(process_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "process_group must be None or a torch.distributed ProcessGroup, got "
            f"{process_group!r} ({type(process_group).__name__})"
        )


def _per_row_triton(logits, labels, precomputed_lse, label_smoothing, logit_scale,
                    lse_square_scale, ignore_index, inplace_backward, process_group):  # fmt: skip
    """(loss, z_loss) per row, (n_rows,) fp32, on the kernels."""
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"logits must be one of {KERNEL_DTYPES} for backend='triton', got {logits.dtype}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    args = (
        logits, labels.contiguous(), precomputed_lse, float(label_smoothing), float(logit_scale),
        float(lse_square_scale), int(ignore_index), bool(inplace_backward),
    )  # fmt: skip
    if process_group is not None:
        return _VocabParallelCrossEntropy.apply(*args, process_group)
    loss, z_loss, _ = _cross_entropy_fwd_op(*args)
    return loss, z_loss


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
    *,
    logit_scale: float = 1.0,
    precomputed_lse: torch.Tensor | None = None,
    process_group=None,
    return_z_loss: bool = False,
    backend: str | None = None,
):
    """Cross-entropy loss with label smoothing and z-loss, like ``F.cross_entropy``.

    Args:
        logits: (n_rows, vocab) fp32, fp16 or bf16 (fp64 on the torch backend); vocab may be
            large (256k): the kernel splits it into column blocks. With a process_group, this
            rank's shard (n_rows, vocab / world_size) of the columns, in rank order.
        labels: (n_rows,) int64 in [0, vocab), or ignore_index for rows to skip.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        lse_square_scale: weight of the z-loss ``lse**2`` added to each row's loss.
        ignore_index: label value of rows that contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        inplace_backward: Triton path only: the backward writes the gradient into the logits'
            storage (their values are gone afterwards). Saves one (n_rows, vocab) buffer.
        logit_scale: > 0, multiplies the logits before everything else.
        precomputed_lse: (n_rows,) logsumexp of the logits (of this rank's shard), used in
            place of computing it when logit_scale == 1 and label_smoothing == 0 (else ignored,
            as in flash-attn 2.x).
        process_group: vocabulary parallelism: the per-row lse and label terms are combined
            across the group (all-gather, all-reduce), so every rank gets the whole loss.
        return_z_loss: also return the z-loss part, reduced alike (for logging: no gradient).
        backend: None/"auto", "triton" or "torch" (see ``flash_attn.ops.backend``). The torch
            backend is ``F.cross_entropy`` where it covers the options, else the reference
            (``flash_attn.ops.reference.cross_entropy``).
    Returns:
        fp32 (fp64 for fp64 logits on the torch backend) scalar, or (n_rows,) for
        reduction="none"; (loss, z_loss) when return_z_loss.
    Raises:
        TypeError, ValueError: see :func:`check_cross_entropy_inputs`; labels out of range;
            logit_scale not a number > 0; precomputed_lse not a float (n_rows,) tensor;
            process_group not a ProcessGroup.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor, got {got}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (n_rows, vocab), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have vocab >= 1 columns, got 0")
    check_cross_entropy_inputs(
        logits, labels, label_smoothing, ignore_index, reduction, lse_square_scale
    )
    _check_loss_options(logits, logit_scale, precomputed_lse, process_group)
    check_labels_in_range(labels, shard_of(logits, process_group)[1], ignore_index)
    labels = labels.long()
    options = (label_smoothing, lse_square_scale, ignore_index)
    if resolve_backend(backend, logits.device, logits.dtype) == "torch":
        no_extension = logit_scale == 1.0 and precomputed_lse is None and process_group is None
        plain = no_extension and not return_z_loss and lse_square_scale == 0.0
        if plain and logits.dtype in (torch.float32, torch.float64):
            # F.cross_entropy covers this case with one fused log-softmax: on a CPU it is
            # faster and allocates less than the reference's separate passes.
            return F.cross_entropy(
                logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                reduction=reduction,
            )  # fmt: skip
        return cross_entropy_ref(
            logits, labels, *options, reduction, logit_scale=logit_scale,
            precomputed_lse=precomputed_lse, process_group=process_group,
            return_z_loss=return_z_loss,
        )  # fmt: skip
    loss, z_loss = _per_row_triton(
        logits, labels, precomputed_lse, label_smoothing, logit_scale, lse_square_scale,
        ignore_index, inplace_backward, process_group,
    )  # fmt: skip
    loss = reduce_loss(loss, labels, ignore_index, reduction)
    if not return_z_loss:
        return loss
    return loss, reduce_loss(z_loss, labels, ignore_index, reduction)


class CrossEntropyOptions(nn.Module):
    """The options shared by :class:`CrossEntropyLoss` and ``LinearCrossEntropyLoss``."""

    def __init__(self, ignore_index: int, label_smoothing: float, lse_square_scale: float,
                 reduction: str, backend: str | None):  # fmt: skip
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.lse_square_scale = label_smoothing, lse_square_scale
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"lse_square_scale={self.lse_square_scale}, reduction={self.reduction!r}"
        )


class CrossEntropyLoss(CrossEntropyOptions):
    """``nn.CrossEntropyLoss`` with z-loss and a fused kernel; see :func:`cross_entropy_loss`.

    forward(logits (n_rows, vocab), labels (n_rows,) int64, precomputed_lse=None) -> scalar, or
    (n_rows,) for reduction="none"; (loss, z_loss) with return_z_loss.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, reduction: str = "mean",
                 inplace_backward: bool = False, backend: str | None = None, *,
                 logit_scale: float = 1.0, process_group=None,
                 return_z_loss: bool = False):  # fmt: skip
        super().__init__(ignore_index, label_smoothing, lse_square_scale, reduction, backend)
        self.inplace_backward, self.logit_scale = inplace_backward, logit_scale
        self.process_group, self.return_z_loss = process_group, return_z_loss

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                precomputed_lse: torch.Tensor | None = None):  # fmt: skip
        return cross_entropy_loss(
            logits, labels, self.label_smoothing, self.lse_square_scale, self.ignore_index,
            self.reduction, self.inplace_backward, logit_scale=self.logit_scale,
            precomputed_lse=precomputed_lse, process_group=self.process_group,
            return_z_loss=self.return_z_loss, backend=self.backend,
        )  # fmt: skip


def check_reduction(reduction: str) -> None:
    """ValueError unless reduction is one of "mean", "sum", "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
