"""Cross-entropy with label smoothing, logit scale and z-loss in Triton, and its launches
(:class:`CrossEntropyForward`, :class:`CrossEntropyBackward`, built once per call signature;
the functions :func:`cross_entropy_fwd` and :func:`cross_entropy_bwd` keep one per signature).

Layout: logits (n_rows, n_cols) with a unit column stride, labels (n_rows,) int64. The vocabulary
is split into column blocks of BLOCK_N: program (row, block) reduces its block to a partial
log-sum-exp and a partial loss, and the host combines the blocks with a logsumexp over
(n_rows, n_blocks). A 256k vocabulary is then 16 programs per row on a GPU instead of one
program that walks it serially, and no tile has to hold a whole row.

Per row, with x = logit_scale * logits, lse = logsumexp(x), y the label, eps the label smoothing
and V the number of classes:

    loss = lse - (1 - eps) * x[y] - eps / V * sum(x) + lse_square_scale * lse**2
    dlogits = dloss * logit_scale
              * (softmax(x) * (1 + 2 * lse_square_scale * lse) - (1 - eps) * [j == y] - eps / V)

and rows whose label is ignore_index have loss 0 and gradient 0. For a vocabulary split across
ranks, the logits hold the classes [class_start, class_start + n_cols) of V = total_classes:
the forward returns this shard's label terms and lse, the caller combines them across ranks,
and the backward takes the combined lse. Everything is accumulated in
fp32 whatever the logits' dtype, because fp16 sums over 50k terms lose several digits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.launch import (
    LaunchPlan,
    cdiv,
    device_guard,
    next_power_of_2,
)
from flash_attn.ops.plans import PlanCache, call_signature, contiguous_aligned


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits,  # (n_rows, n_cols), unit column stride
    Labels,  # (n_rows,) int64
    LsePartial,  # (n_rows, n_blocks) fp32: log-sum-exp of this block
    LossPartial,  # (n_rows, n_blocks) fp32: -(1 - eps) * x[y] (if y is here) - eps / V * sum(x)
    stride_row,
    n_cols,
    n_blocks,
    label_smoothing,
    logit_scale,
    ignore_index,
    class_start,  # the class of column 0 (vocabulary shards)
    total_classes,  # V
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    x = tl.load(Logits + row * stride_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    x = x * logit_scale  # logit_scale > 0 keeps the padding at -inf
    label = tl.load(Labels + row)

    m = tl.max(x, 0)
    lse = m + tl.log(tl.sum(tl.exp(x - m), 0))
    # A label outside this shard matches no column (in_row: nor the -inf padding past it); its
    # logit is added by the rank that holds it.
    is_label = (cols == label - class_start) & in_row
    loss = tl.sum(tl.where(is_label, -(1.0 - label_smoothing) * x, 0.0), 0)
    if label_smoothing > 0.0:
        loss -= label_smoothing / total_classes * tl.sum(tl.where(in_row, x, 0.0), 0)
    # Ignored rows still get their lse (the host zeroes their loss), so the output is defined.
    loss = tl.where(label == ignore_index, 0.0, loss)
    tl.store(LsePartial + row * n_blocks + block, lse)
    tl.store(LossPartial + row * n_blocks + block, loss)


@triton.jit
def _cross_entropy_bwd_kernel(
    DLogits,  # (n_rows, n_cols), unit column stride; may be Logits itself (in-place backward)
    Logits,  # (n_rows, n_cols), unit column stride
    Labels,  # (n_rows,) int64
    Lse,  # (n_rows,) fp32, the combined log-sum-exp of the forward
    DLoss,  # (n_rows,) fp32, gradient of the per-row loss
    stride_dlogits_row,
    stride_logits_row,
    stride_dloss,
    n_cols,
    label_smoothing,
    logit_scale,
    lse_square_scale,
    ignore_index,
    class_start,
    total_classes,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    x = tl.load(Logits + row * stride_logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
    x = x * logit_scale
    label = tl.load(Labels + row)
    lse = tl.load(Lse + row)
    dloss = tl.load(DLoss + row * stride_dloss)
    dloss = tl.where(label == ignore_index, 0.0, dloss)

    probs = tl.exp(x - lse)
    # d(lse^2)/dx = 2 * lse * softmax(x): the z-loss only rescales the softmax term.
    dx = probs * (1.0 + 2.0 * lse_square_scale * lse)
    dx -= tl.where(cols == label - class_start, 1.0 - label_smoothing, 0.0)
    if label_smoothing > 0.0:
        dx -= label_smoothing / total_classes
    dx = dx * (dloss * logit_scale)
    tl.store(
        DLogits + row * stride_dlogits_row + cols, dx.to(DLogits.dtype.element_ty), mask=in_row
    )


def _block_n(n_cols: int) -> int:
    # The interpreter runs programs one by one in NumPy, so it prefers a few wide blocks.
    cap = 16384 if interpreter_enabled() else 8192
    return min(next_power_of_2(max(n_cols, 1)), cap)


def _num_warps(block_n: int) -> int:
    # About 32 fp32 elements per thread for the widest blocks.
    return 4 if block_n <= 2048 else 8


class CrossEntropyForward:
    """The forward kernel at one call signature (shapes, strides, dtypes, options): built from
    the first call's tensors (their metadata only), then called with each call's tensors.

    Args (construction; the call takes logits and labels):
        logits: (n_rows, n_cols) fp32/fp16/bf16 with a unit column stride, any row stride: the
            classes [class_start, class_start + n_cols) of total_classes (default n_cols).
        labels: (n_rows,) int64, contiguous, each in [0, total_classes) or ignore_index.
        label_smoothing, ignore_index: as in the module docstring.
        logit_scale: > 0, multiplies the logits first.
    Call returns (label_terms, lse), each (n_rows,) fp32:
        label_terms: -(1 - eps) * x[y] (where y is in this shard) - eps / total_classes * sum(x);
            0 where the label is ignore_index.
        lse: logsumexp of this shard's scaled logits (ignored rows too).
        The loss is label_terms + lse once both are summed / logsumexp'ed over the shards.
    """

    def __init__(
        self,
        logits,
        labels,
        *,
        label_smoothing: float,
        ignore_index: int,
        logit_scale: float = 1.0,
        class_start: int = 0,
        total_classes: int | None = None,
    ):
        n_rows, n_cols = logits.shape
        block_n = _block_n(n_cols)
        n_blocks = cdiv(n_cols, block_n)
        self.device = logits.device
        # One block per row (a vocabulary up to BLOCK_N): the partials are the results.
        self.partial_shape = (n_rows, n_blocks) if n_blocks > 1 else (n_rows,)
        self.combine = n_blocks > 1
        self.empty = n_rows == 0
        self.launch = LaunchPlan(
            _cross_entropy_fwd_kernel,
            (n_rows, n_blocks),
            ("Logits", "Labels", "LsePartial", "LossPartial"),
            stride_row=logits.stride(0),
            n_cols=n_cols,
            n_blocks=n_blocks,
            label_smoothing=float(label_smoothing),
            logit_scale=float(logit_scale),
            ignore_index=int(ignore_index),
            class_start=int(class_start),
            total_classes=int(total_classes or n_cols),
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )

    def __call__(self, logits, labels):
        lse_partial = torch.empty(self.partial_shape, dtype=torch.float32, device=self.device)
        loss_partial = torch.empty(self.partial_shape, dtype=torch.float32, device=self.device)
        if not self.empty:
            with device_guard(logits):
                self.launch(logits, labels, lse_partial, loss_partial)
        if self.combine:
            return loss_partial.sum(dim=1), torch.logsumexp(lse_partial, dim=1)
        return loss_partial, lse_partial


class CrossEntropyBackward:
    """The backward kernel at one call signature: built from the metadata of the logits and
    labels (as given to :class:`CrossEntropyForward`) and the layout of the per-row gradient;
    called with each backward's tensors.

    Args (construction):
        logits, labels: as given to the forward.
        dloss_stride: the stride of the calls' dloss (0: one value broadcast to every row).
        inplace: write the gradient over the logits (each program reads its block before
            writing it); else into a new contiguous tensor.
        label_smoothing, lse_square_scale, ignore_index, logit_scale, class_start,
        total_classes: as given to the forward (lse_square_scale: the z-loss weight).
    Call (dloss, logits, lse, labels): dloss (n_rows,) fp32 with the stride given, lse (n_rows,)
    fp32 contiguous, the log-sum-exp of the whole row (combined over the shards). Returns
    dlogits (n_rows, n_cols) in the logits' dtype (the logits themselves in place).
    """

    def __init__(
        self,
        logits,
        labels,
        *,
        dloss_stride: int,
        inplace: bool,
        label_smoothing: float,
        lse_square_scale: float,
        ignore_index: int,
        logit_scale: float = 1.0,
        class_start: int = 0,
        total_classes: int | None = None,
    ):
        n_rows, n_cols = logits.shape
        block_n = _block_n(n_cols)
        self.shape, self.dtype, self.device = logits.shape, logits.dtype, logits.device
        self.inplace = inplace
        self.empty = n_rows == 0
        self.launch = LaunchPlan(
            _cross_entropy_bwd_kernel,
            (n_rows, cdiv(n_cols, block_n)),
            ("DLogits", "Logits", "Labels", "Lse", "DLoss"),
            stride_dlogits_row=logits.stride(0) if inplace else n_cols,
            stride_logits_row=logits.stride(0),
            stride_dloss=dloss_stride,
            n_cols=n_cols,
            label_smoothing=float(label_smoothing),
            logit_scale=float(logit_scale),
            lse_square_scale=float(lse_square_scale),
            ignore_index=int(ignore_index),
            class_start=int(class_start),
            total_classes=int(total_classes or n_cols),
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )

    def __call__(self, dloss, logits, lse, labels):
        if self.inplace:
            dlogits = logits
        else:
            dlogits = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if not self.empty:
            with device_guard(logits):
                self.launch(dlogits, logits, labels, lse, dloss)
        return dlogits


# -- the launches as functions, one plan per call signature ------------------------------------

_forward_plans, _backward_plans = PlanCache(), PlanCache()


def cross_entropy_fwd(
    logits,
    labels,
    label_smoothing,
    ignore_index,
    logit_scale=1.0,
    class_start=0,
    total_classes=None,
):
    """Per-row label terms and log-sum-exp of one vocabulary shard: the launch of
    :class:`CrossEntropyForward` (its arguments and return value) through a plan kept per call
    signature. Inputs are assumed validated (see ``flash_attn.ops.cross_entropy``).

    Args:
        logits: (n_rows, n_cols) fp32/fp16/bf16 with a unit column stride: the classes
            [class_start, class_start + n_cols) of total_classes (default n_cols).
        labels: (n_rows,) int64, each in [0, total_classes) or equal to ignore_index.
        logit_scale: > 0, multiplies the logits first.
    Returns:
        label_terms, lse: (n_rows,) fp32 each (see :class:`CrossEntropyForward`).
    """
    options = dict(
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        class_start=class_start,
        total_classes=total_classes,
    )
    key = call_signature((logits, labels), tuple(options.values()))
    plan = _forward_plans.get(key)
    if plan is None:
        plan = _forward_plans.keep(key, CrossEntropyForward(logits, labels, **options))
    return plan(logits, labels)


def cross_entropy_bwd(
    dloss,
    logits,
    lse,
    labels,
    label_smoothing,
    lse_square_scale,
    ignore_index,
    dlogits=None,
    logit_scale=1.0,
    class_start=0,
    total_classes=None,
):
    """Gradient of the per-row loss with respect to the logits (of one vocabulary shard): the
    launch of :class:`CrossEntropyBackward` through a plan kept per call signature.

    Args:
        dloss: (n_rows,) gradient of the per-row loss (any float dtype, any stride).
        logits, labels, label_smoothing, ignore_index, logit_scale, class_start, total_classes:
            as in the forward.
        lse: (n_rows,) fp32 log-sum-exp of the whole row (combined over the shards).
        dlogits: None, or ``logits`` itself to write the gradient over the logits (each
            program reads its block before writing it, so this is safe); another tensor
            (n_rows, n_cols) with a unit column stride receives a copy of the gradient.
    Returns:
        dlogits: (n_rows, n_cols) in the logits' dtype (contiguous, or the logits / dlogits
        given).
    """
    if dloss.dtype != torch.float32:
        dloss = dloss.to(torch.float32)
    lse = contiguous_aligned(lse)
    inplace = dlogits is logits
    options = dict(
        dloss_stride=dloss.stride(0),
        inplace=inplace,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        class_start=class_start,
        total_classes=total_classes,
    )
    key = call_signature((dloss, logits, labels), tuple(options.values()))
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans.keep(key, CrossEntropyBackward(logits, labels, **options))
    out = plan(dloss, logits, lse, labels)
    return out if dlogits is None or inplace else dlogits.copy_(out)
