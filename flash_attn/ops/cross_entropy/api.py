"""Fused cross-entropy: functional API and backend dispatch.

``cross_entropy_loss`` computes what ``F.cross_entropy`` computes with the same ``ignore_index``,
``label_smoothing`` and ``reduction``, plus the z-loss ``lse_square_scale * lse**2``. The Triton
path never materialises the softmax: the forward keeps one fp32 log-sum-exp per row, the backward
recomputes the probabilities from it, and with ``inplace_backward=True`` writes the gradient over
the logits, so a (tokens, vocab) loss costs one logits-sized buffer instead of three.

The Triton path is, in eager mode, ``function.py``'s :class:`CrossEntropyFunction` over the
launches of the call signature (kept in its plan), and under ``torch.compile`` its custom ops.
``cross_entropy_loss_2x`` has flash-attn 2.x's signature (per-row results). The modules
(``CrossEntropyLoss``) are in ``flash_attn.modules.losses``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flash_attn.ops.backend import reads_values, resolve_backend
from flash_attn.ops.cross_entropy.function import (
    CrossEntropyFunction,
    CrossEntropyLaunches,
    VocabParallelCrossEntropy,
    cross_entropy_fwd_op,
    uses_precomputed_lse,
)
from flash_attn.ops.cross_entropy.reference import (
    REDUCTIONS,
    cross_entropy_ref,
    reduce_loss,
    shard_of,
)
from flash_attn.ops.plans import PlanCache, call_signature
from flash_attn.utils.checks import check_float

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_plans = PlanCache()  # per call signature of cross_entropy_loss: a _LossPlan


class _LossPlan:
    """What one call signature of :func:`cross_entropy_loss` resolved to (checked on its first
    call): the backend, what the kernels need copied, and their launches (built by the first
    eager call without a process group)."""

    def __init__(self, use_triton: bool, logits, labels):
        self.use_triton = use_triton
        self.copy_logits = logits.stride(-1) != 1  # the kernels read unit-stride columns
        self.convert_labels = labels.dtype != torch.int64 or not labels.is_contiguous()
        self.launches = None


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


def _per_row_triton(
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
    """(loss, z_loss) per row, (n_rows,) fp32, on the kernels (logits of their dtypes)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    args = (
        logits,
        labels.contiguous(),
        precomputed_lse,
        float(label_smoothing),
        float(logit_scale),
        float(lse_square_scale),
        int(ignore_index),
        bool(inplace_backward),
    )
    if process_group is not None:
        return VocabParallelCrossEntropy.apply(*args, process_group)
    loss, z_loss, _ = cross_entropy_fwd_op(*args)
    return loss, z_loss


def _loss_eager(
    plan: _LossPlan,
    logits,
    labels,
    precomputed_lse,
    label_smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    inplace_backward,
    reduction,
    return_z_loss,
):
    """The Triton path outside ``torch.compile``: the plan's launches, under
    :class:`CrossEntropyFunction` where a gradient is needed; returns what
    :func:`cross_entropy_loss` returns."""
    if plan.copy_logits:
        logits = logits.contiguous()
    if plan.convert_labels:
        labels = labels.long().contiguous()
    if plan.launches is None:
        plan.launches = CrossEntropyLaunches(
            logits,
            labels,
            label_smoothing=float(label_smoothing),
            logit_scale=float(logit_scale),
            lse_square_scale=float(lse_square_scale),
            ignore_index=int(ignore_index),
            inplace_backward=bool(inplace_backward),
            use_precomputed_lse=uses_precomputed_lse(precomputed_lse, logit_scale, label_smoothing),
            reduction=reduction,
            return_z_loss=return_z_loss,
        )
    if torch.is_grad_enabled() and (
        logits.requires_grad or (precomputed_lse is not None and precomputed_lse.requires_grad)
    ):
        return CrossEntropyFunction.apply(logits, labels, precomputed_lse, plan.launches)
    loss, z_loss, _, _ = plan.launches.forward(logits, labels, precomputed_lse)
    return (loss, z_loss) if return_z_loss else loss


def _check_inputs(
    logits,
    labels,
    label_smoothing,
    lse_square_scale,
    ignore_index,
    reduction,
    logit_scale,
    precomputed_lse,
    process_group,
) -> None:
    """The checks of :func:`cross_entropy_loss` but the label values."""
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
            (``flash_attn.ops.cross_entropy.reference``).
    Returns:
        fp32 (fp64 for fp64 logits on the torch backend) scalar, or (n_rows,) for
        reduction="none"; (loss, z_loss) when return_z_loss.
    Raises:
        TypeError, ValueError: see :func:`check_cross_entropy_inputs`; labels out of range;
            logit_scale not a number > 0; precomputed_lse not a float (n_rows,) tensor;
            process_group not a ProcessGroup.
    """
    key = call_signature(
        (logits, labels, precomputed_lse, process_group),
        (
            label_smoothing,
            lse_square_scale,
            ignore_index,
            reduction,
            inplace_backward,
            logit_scale,
            return_z_loss,
            backend,
        ),
    )
    plan = _plans.get(key)
    if plan is None:
        _check_inputs(
            logits,
            labels,
            label_smoothing,
            lse_square_scale,
            ignore_index,
            reduction,
            logit_scale,
            precomputed_lse,
            process_group,
        )
        use_triton = resolve_backend(backend, logits.device, logits.dtype) == "triton"
        if use_triton and logits.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"logits must be one of {KERNEL_DTYPES} for backend='triton', got {logits.dtype}"
            )
        plan = _plans.keep(key, _LossPlan(use_triton, logits, labels))
    # Where reading the labels costs no synchronisation: at every call.
    check_labels_in_range(labels, shard_of(logits, process_group)[1], ignore_index)
    if plan.use_triton and process_group is None and not torch.compiler.is_compiling():
        return _loss_eager(
            plan,
            logits,
            labels,
            precomputed_lse,
            label_smoothing,
            logit_scale,
            lse_square_scale,
            ignore_index,
            inplace_backward,
            reduction,
            return_z_loss,
        )
    labels = labels.long()
    options = (label_smoothing, lse_square_scale, ignore_index)
    if not plan.use_triton:
        no_extension = logit_scale == 1.0 and precomputed_lse is None and process_group is None
        plain = no_extension and not return_z_loss and lse_square_scale == 0.0
        if plain and logits.dtype in (torch.float32, torch.float64):
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
            logits,
            labels,
            *options,
            reduction,
            logit_scale=logit_scale,
            precomputed_lse=precomputed_lse,
            process_group=process_group,
            return_z_loss=return_z_loss,
        )
    loss, z_loss = _per_row_triton(
        logits,
        labels,
        precomputed_lse,
        label_smoothing,
        logit_scale,
        lse_square_scale,
        ignore_index,
        inplace_backward,
        process_group,
    )
    loss = reduce_loss(loss, labels, ignore_index, reduction)
    if not return_z_loss:
        return loss
    return loss, reduce_loss(z_loss, labels, ignore_index, reduction)


def check_reduction(reduction: str) -> None:
    """ValueError unless reduction is one of "mean", "sum", "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy_loss_2x(
    logits: torch.Tensor,
    labels: torch.Tensor,
    precomputed_lse: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    ignore_index=-100,
    inplace_backward: bool = False,
    process_group=None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn 2.x's ``cross_entropy_loss`` (``flash_attn.ops.triton.cross_entropy``
    re-exports it by that name): per-row cross-entropy of logits (n_rows, vocab) (this rank's
    vocabulary shard with a process_group) against labels (n_rows,); arguments as in
    :func:`cross_entropy_loss`.

    Returns:
        losses: (n_rows,) fp32, z-loss included, 0 where the label is ignore_index.
        z_losses: (n_rows,) fp32, lse_square_scale * lse**2, for logging (no gradient).
    """
    return cross_entropy_loss(
        logits,
        labels,
        label_smoothing,
        lse_square_scale,
        ignore_index,
        "none",
        inplace_backward,
        logit_scale=logit_scale,
        precomputed_lse=precomputed_lse,
        process_group=process_group,
        return_z_loss=True,
        backend=backend,
    )
