"""Fused cross-entropy: custom ops over the Triton kernels, functional API and module.

``cross_entropy_loss`` computes what ``F.cross_entropy`` computes with the same ``ignore_index``,
``label_smoothing`` and ``reduction``, plus the z-loss ``lse_square_scale * lse**2``. The Triton
path never materialises the softmax: the forward keeps one fp32 log-sum-exp per row, the backward
recomputes the probabilities from it, and with ``inplace_backward=True`` writes the gradient over
the logits, so a (tokens, vocab) loss costs one logits-sized buffer instead of three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.reference.cross_entropy import REDUCTIONS, cross_entropy_ref, reduce_loss

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The Triton module is imported inside each op so that ``import flash_attn`` works without Triton.
@torch.library.custom_op("flash_attn::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    lse_square_scale: float,
    ignore_index: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_fwd

    return cross_entropy_fwd(logits, labels, label_smoothing, lse_square_scale, ignore_index)


@_cross_entropy_fwd_op.register_fake
def _(logits, labels, label_smoothing, lse_square_scale, ignore_index, inplace_backward):
    n_rows = logits.shape[0]
    return logits.new_empty(n_rows, dtype=torch.float32), logits.new_empty(
        n_rows, dtype=torch.float32
    )


# Both backward ops take: dloss, logits, lse, labels, label_smoothing, lse_square_scale,
# ignore_index; the in-place one writes the gradient over the logits.
@torch.library.custom_op("flash_attn::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    dloss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
    label_smoothing: float, lse_square_scale: float, ignore_index: int,
) -> torch.Tensor:  # fmt: skip
    from flash_attn.ops.triton.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(
        dloss, logits, lse, labels, label_smoothing, lse_square_scale, ignore_index
    )


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, lse, labels, label_smoothing, lse_square_scale, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("flash_attn::cross_entropy_bwd_inplace", mutates_args=("logits",))
def _cross_entropy_bwd_inplace_op(
    dloss: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
    label_smoothing: float, lse_square_scale: float, ignore_index: int,
) -> None:  # fmt: skip
    from flash_attn.ops.triton.cross_entropy import cross_entropy_bwd

    cross_entropy_bwd(
        dloss, logits, lse, labels, label_smoothing, lse_square_scale, ignore_index, logits
    )


def _setup_context(ctx, inputs, output):
    logits, labels, label_smoothing, lse_square_scale, ignore_index, inplace_backward = inputs
    _, lse = output
    ctx.save_for_backward(logits, lse, labels)
    ctx.options = (label_smoothing, lse_square_scale, ignore_index)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dloss, dlse):
    logits, lse, labels = ctx.saved_tensors
    if ctx.inplace_backward:
        # The logits are not needed after this: their storage receives the gradient.
        torch.ops.flash_attn.cross_entropy_bwd_inplace(dloss, logits, lse, labels, *ctx.options)
        dlogits = logits
    else:
        dlogits = torch.ops.flash_attn.cross_entropy_bwd(dloss, logits, lse, labels, *ctx.options)
    return dlogits, None, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def check_cross_entropy_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    logits_name: str = "logits",
) -> None:
    """Validate the arguments shared by the cross-entropy and linear cross-entropy APIs.

    Raises:
        TypeError: a non-float ``logits_name`` tensor or non-integer labels.
        ValueError: shapes that disagree, an unknown reduction, label smoothing outside
            [0, 1], or a label outside [0, vocab) that is not ignore_index.
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
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError when a label is outside [0, vocab) and is not ignore_index.

    This reads the labels on the host (one device sync); it is skipped while torch.compile
    traces, where a data-dependent branch would break the graph.
    """
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} out of range)"
        )


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy loss with label smoothing and z-loss, like ``F.cross_entropy``.

    Args:
        logits: (n_rows, vocab) fp32, fp16 or bf16 (fp64 on the torch backend); vocab may be
            large (256k): the kernel splits it into column blocks.
        labels: (n_rows,) int64 in [0, vocab), or ignore_index for rows to skip.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        lse_square_scale: weight of the z-loss ``lse**2`` added to each row's loss.
        ignore_index: label value of rows that contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        inplace_backward: Triton path only: the backward writes the gradient into the logits'
            storage (their values are gone afterwards). Saves one (n_rows, vocab) buffer.
        backend: None/"auto", "triton" or "torch" (see ``flash_attn.ops.backend``). The torch
            backend is ``F.cross_entropy`` for fp32/fp64 logits without z-loss, else the
            reference (``flash_attn.ops.reference.cross_entropy``).
    Returns:
        fp32 (fp64 for fp64 logits) scalar, or (n_rows,) for reduction="none".
    Raises:
        TypeError, ValueError: see :func:`check_cross_entropy_inputs`; labels out of range.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a floating-point tensor, got {got}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (n_rows, vocab), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have vocab >= 1 columns, got 0")
    check_cross_entropy_inputs(logits, labels, label_smoothing, ignore_index, reduction)
    check_labels_in_range(labels, logits.shape[1], ignore_index)
    labels = labels.long()
    backend = resolve_backend(backend, logits.device)
    if backend == "torch":
        if lse_square_scale == 0.0 and logits.dtype in (torch.float32, torch.float64):
            # F.cross_entropy covers this case with one fused log-softmax: on a CPU it is
            # faster and allocates less than the reference's separate passes.
            return F.cross_entropy(
                logits,
                labels,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                reduction=reduction,
            )
        return cross_entropy_ref(
            logits, labels, label_smoothing, lse_square_scale, ignore_index, reduction
        )
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"logits must be one of {KERNEL_DTYPES} for backend='triton', got {logits.dtype}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, _ = torch.ops.flash_attn.cross_entropy_fwd(
        logits,
        labels.contiguous(),
        float(label_smoothing),
        float(lse_square_scale),
        int(ignore_index),
        bool(inplace_backward),
    )
    return reduce_loss(loss, labels, ignore_index, reduction)


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

    forward(logits (n_rows, vocab), labels (n_rows,) int64) -> scalar, or (n_rows,) for
    reduction="none".
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, reduction: str = "mean",
                 inplace_backward: bool = False, backend: str | None = None):  # fmt: skip
        super().__init__(ignore_index, label_smoothing, lse_square_scale, reduction, backend)
        self.inplace_backward = inplace_backward

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(
            logits, labels, self.label_smoothing, self.lse_square_scale, self.ignore_index,
            self.reduction, self.inplace_backward, backend=self.backend,
        )  # fmt: skip


def check_reduction(reduction: str) -> None:
    """ValueError unless reduction is one of "mean", "sum", "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
