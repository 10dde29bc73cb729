"""Cross-entropy with label smoothing, logit scale and z-loss in Triton, and its launchers.

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
from flash_attn.ops.launch import cdiv, device_guard, launch, next_power_of_2


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


def cross_entropy_fwd(
    logits,
    labels,
    label_smoothing,
    ignore_index,
    logit_scale=1.0,
    class_start=0,
    total_classes=None,
):
    """Per-row label terms and log-sum-exp of one vocabulary shard. Inputs are assumed validated
    (see ``flash_attn.ops.cross_entropy``).

    Args:
        logits: (n_rows, n_cols) fp32/fp16/bf16 with a unit column stride: the classes
            [class_start, class_start + n_cols) of total_classes (default n_cols).
        labels: (n_rows,) int64, each in [0, total_classes) or equal to ignore_index.
        logit_scale: > 0, multiplies the logits first.
    Returns:
        label_terms: (n_rows,) fp32, -(1 - eps) * x[y] (where y is in this shard)
            - eps / total_classes * sum(x); 0 where the label is ignore_index.
        lse: (n_rows,) fp32, logsumexp of this shard's scaled logits (ignored rows too).
        The loss is label_terms + lse once both are summed / logsumexp'ed over the shards.
    """
    n_rows, n_cols = logits.shape
    block_n = _block_n(n_cols)
    n_blocks = cdiv(n_cols, block_n)
    # One block per row (a vocabulary up to BLOCK_N): the partials are the results.
    partial_shape = (n_rows, n_blocks) if n_blocks > 1 else (n_rows,)
    lse_partial = torch.empty(partial_shape, dtype=torch.float32, device=logits.device)
    loss_partial = torch.empty_like(lse_partial)
    if n_rows > 0:
        with device_guard(logits):
            launch(
                _cross_entropy_fwd_kernel,
                (n_rows, n_blocks),
                logits,
                labels,
                lse_partial,
                loss_partial,
                logits.stride(0),
                n_cols,
                n_blocks,
                float(label_smoothing),
                float(logit_scale),
                int(ignore_index),
                int(class_start),
                int(total_classes or n_cols),
                BLOCK_N=block_n,
                num_warps=_num_warps(block_n),
            )
    if n_blocks == 1:
        return loss_partial, lse_partial
    return loss_partial.sum(dim=1), torch.logsumexp(lse_partial, dim=1)


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
    """Gradient of the per-row loss with respect to the logits (of one vocabulary shard).

    Args:
        dloss: (n_rows,) gradient of the per-row loss (any float dtype, any stride).
        logits, labels, label_smoothing, ignore_index, logit_scale, class_start, total_classes:
            as in the forward.
        lse: (n_rows,) fp32 log-sum-exp of the whole row (combined over the shards).
        dlogits: (n_rows, n_cols) output buffer with a unit column stride; pass ``logits``
            itself to write the gradient over the logits (each program reads its block before
            writing it, so this is safe). Allocated like ``logits`` when None.
    Returns:
        dlogits: (n_rows, n_cols) in the logits' dtype.
    """
    n_rows, n_cols = logits.shape
    if dlogits is None:
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    dloss = dloss.to(torch.float32)
    block_n = _block_n(n_cols)
    if n_rows > 0:
        with device_guard(logits):
            launch(
                _cross_entropy_bwd_kernel,
                (n_rows, cdiv(n_cols, block_n)),
                dlogits,
                logits,
                labels,
                lse,
                dloss,
                dlogits.stride(0),
                logits.stride(0),
                dloss.stride(0),
                n_cols,
                float(label_smoothing),
                float(logit_scale),
                float(lse_square_scale),
                int(ignore_index),
                int(class_start),
                int(total_classes or n_cols),
                BLOCK_N=block_n,
                num_warps=_num_warps(block_n),
            )
    return dlogits
