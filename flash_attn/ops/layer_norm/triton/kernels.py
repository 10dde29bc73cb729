"""LayerNorm / RMSNorm fused with dropout and residual adds, forward and backward, in Triton.

One program normalises one row of the (M, N) inputs:

    h    = dropout(x * rowscale) + dropout(x1) + residual     (each term optional)
    y    = norm(h) * weight + bias                            (weight + 1 when zero-centred)
    y1   = norm(h) * weight1 + bias1                          (the parallel-block second output)

It writes h (``residual_out``) when asked. Rows up to ``MAX_BLOCK`` elements stay in registers
for the whole program; longer rows are walked in chunks of ``CHUNK_BLOCK``, re-reading the inputs
three times (sum, centred sum of squares, output) instead of holding them.

Numerics: statistics and the affine transforms are computed in fp32 whatever the input dtype;
the variance is the mean of squared deviations from the mean (two passes, no E[x^2] - E[x]^2
cancellation). Mean and rstd are stored in fp32 for the backward.

Dropout draws from Philox keyed by a seed tensor and the element's flat index: row * N + col
for x, (M + row) * N + col for x1, so the backward regenerates the masks instead of storing
them (they are stored only when the caller asks to see them). The backward splits rows among a
few programs; each sums the weight and bias gradients over its rows into its own row of an fp32
partial buffer, and a second kernel adds those rows up in order and casts the sums to the
weights' dtypes: no atomics, so it is bit-reproducible.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.launch import (
    LaunchPlan,
    cdiv,
    device_guard,
    next_power_of_2,
    row_strides,
)
from flash_attn.ops.plans import PlanCache, call_signature, contiguous_aligned

# Rows longer than this are processed in chunks (64 KiB of fp64 would not fit; 8192 fp32 does).
MAX_BLOCK = 8192
CHUNK_BLOCK = 4096


@triton.jit
def _keep(seed, stream_row, cols, N, dropout_p):
    """Dropout keep mask of one row: stream_row is row for x, M + row for x1."""
    return tl.rand(seed, stream_row * N + cols) >= dropout_p


@triton.jit
def _dropped(x, seed, stream_row, cols, N, dropout_p, HAS_DROPOUT: tl.constexpr):
    """x with dropout applied (kept elements scaled by 1 / (1 - dropout_p))."""
    if HAS_DROPOUT:
        keep = _keep(seed, stream_row, cols, N, dropout_p)
        x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
    return x


@triton.jit
def _norm_input(
    X,
    X1,
    R,
    seed,
    scale,
    row,
    M,
    cols,
    mask,
    N,
    dropout_p,
    HAS_X1: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """fp32 h = dropout(x * rowscale) + dropout(x1) + residual for the columns cols of one row
    (X, X1, R point at the row; scale is the row's rowscale)."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        x *= scale
    x = _dropped(x, seed, row, cols, N, dropout_p, HAS_DROPOUT)
    if HAS_X1:
        x1 = tl.load(X1 + cols, mask=mask, other=0.0).to(tl.float32)
        x += _dropped(x1, seed, row + M, cols, N, dropout_p, HAS_DROPOUT)
    if HAS_RESIDUAL:
        x += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _load_weight(W, cols, mask, ZERO_CENTERED_WEIGHT: tl.constexpr):
    """fp32 weight (weight + 1 when zero-centred), 0 outside the row."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTERED_WEIGHT:
        w = tl.where(mask, w + 1.0, 0.0)
    return w


@triton.jit
def _store_affine(
    Y, W, B, xhat, cols, mask, ZERO_CENTERED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    y = xhat * _load_weight(W, cols, mask, ZERO_CENTERED_WEIGHT)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask).to(tl.float32)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _store_outputs(
    Y,
    Y1,
    W,
    B,
    W1,
    B1,
    xhat,
    cols,
    mask,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
):
    """y = xhat * weight + bias, and y1 = xhat * weight1 + bias1 when there is a weight1."""
    _store_affine(Y, W, B, xhat, cols, mask, ZERO_CENTERED_WEIGHT, HAS_BIAS)
    if HAS_W1:
        _store_affine(Y1, W1, B1, xhat, cols, mask, ZERO_CENTERED_WEIGHT, HAS_B1)


@triton.jit
def _store_keep_masks(KEEP, KEEP1, seed, row, M, cols, mask, N, dropout_p, HAS_X1: tl.constexpr):
    """Write the dropout keep masks of x (and x1) for the columns cols of one row."""
    tl.store(KEEP + row * N + cols, _keep(seed, row, cols, N, dropout_p), mask=mask)
    if HAS_X1:
        tl.store(KEEP1 + row * N + cols, _keep(seed, row + M, cols, N, dropout_p), mask=mask)


@triton.jit
def _first_pass_input(
    X,
    X1,
    R,
    RESIDUAL_OUT,
    KEEP,
    KEEP1,
    seed,
    scale,
    row,
    M,
    cols,
    mask,
    N,
    dropout_p,
    HAS_X1: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    STORE_DROPOUT_MASK: tl.constexpr,
):
    """h for the columns cols of one row, writing residual_out and the keep masks on the way
    (RESIDUAL_OUT points at the row; KEEP and KEEP1 at the whole masks)."""
    x = _norm_input(
        X,
        X1,
        R,
        seed,
        scale,
        row,
        M,
        cols,
        mask,
        N,
        dropout_p,
        HAS_X1,
        HAS_RESIDUAL,
        HAS_ROWSCALE,
        HAS_DROPOUT,
    )
    if STORE_RESIDUAL_OUT:
        tl.store(RESIDUAL_OUT + cols, x.to(RESIDUAL_OUT.dtype.element_ty), mask=mask)
    if STORE_DROPOUT_MASK:
        _store_keep_masks(KEEP, KEEP1, seed, row, M, cols, mask, N, dropout_p, HAS_X1)
    return x


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N), row stride stride_x_row, unit column stride
    X1,  # (M, N) second input, row stride stride_x1_row; read when HAS_X1
    R,  # (M, N) residual, row stride stride_r_row; read when HAS_RESIDUAL
    W,
    B,  # (N,) weight; (N,) bias, read when HAS_BIAS
    W1,
    B1,  # (N,) second weight and bias; read when HAS_W1 / HAS_B1
    Y,
    Y1,  # (M, N) contiguous outputs; Y1 written when HAS_W1
    RESIDUAL_OUT,  # (M, N) contiguous h; written when STORE_RESIDUAL_OUT
    KEEP,
    KEEP1,  # (M, N) bool dropout keep masks of x and x1; written when STORE_DROPOUT_MASK
    RowScale,  # (M,) read when HAS_ROWSCALE
    Mean,
    Rstd,  # (M,) fp32; Mean is 0 for RMSNorm
    Seed,  # (1,) int64, read when HAS_DROPOUT
    stride_x_row,
    stride_x1_row,
    stride_r_row,
    M,
    N,
    eps,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    STORE_DROPOUT_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x_row
    X1 += row * stride_x1_row
    R += row * stride_r_row
    Y += row * N
    Y1 += row * N
    RESIDUAL_OUT += row * N
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    scale = 1.0
    if HAS_ROWSCALE:
        scale = tl.load(RowScale + row).to(tl.float32)
    offs = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        # The whole row stays in registers: one read of the inputs, one write of each output.
        mask = offs < N
        x = _first_pass_input(
            X,
            X1,
            R,
            RESIDUAL_OUT,
            KEEP,
            KEEP1,
            seed,
            scale,
            row,
            M,
            offs,
            mask,
            N,
            dropout_p,
            HAS_X1,
            HAS_RESIDUAL,
            HAS_ROWSCALE,
            HAS_DROPOUT,
            STORE_RESIDUAL_OUT,
            STORE_DROPOUT_MASK,
        )
        if IS_RMS_NORM:
            var = tl.sum(x * x, axis=0) / N
            mean = var * 0.0
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _store_outputs(
            Y,
            Y1,
            W,
            B,
            W1,
            B1,
            (x - mean) * rstd,
            offs,
            mask,
            ZERO_CENTERED_WEIGHT,
            HAS_BIAS,
            HAS_W1,
            HAS_B1,
        )
    else:
        # Chunked: h is recomputed from the inputs (the dropout masks are deterministic) on
        # every pass rather than read back from RESIDUAL_OUT, which may be in a lower dtype.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = _first_pass_input(
                X,
                X1,
                R,
                RESIDUAL_OUT,
                KEEP,
                KEEP1,
                seed,
                scale,
                row,
                M,
                cols,
                mask,
                N,
                dropout_p,
                HAS_X1,
                HAS_RESIDUAL,
                HAS_ROWSCALE,
                HAS_DROPOUT,
                STORE_RESIDUAL_OUT,
                STORE_DROPOUT_MASK,
            )
            if IS_RMS_NORM:
                acc += x * x
            else:
                acc += x
        if IS_RMS_NORM:
            var = tl.sum(acc, axis=0) / N
            mean = var * 0.0
        else:
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                mask = cols < N
                x = _norm_input(
                    X,
                    X1,
                    R,
                    seed,
                    scale,
                    row,
                    M,
                    cols,
                    mask,
                    N,
                    dropout_p,
                    HAS_X1,
                    HAS_RESIDUAL,
                    HAS_ROWSCALE,
                    HAS_DROPOUT,
                )
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            var = tl.sum(acc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = _norm_input(
                X,
                X1,
                R,
                seed,
                scale,
                row,
                M,
                cols,
                mask,
                N,
                dropout_p,
                HAS_X1,
                HAS_RESIDUAL,
                HAS_ROWSCALE,
                HAS_DROPOUT,
            )
            _store_outputs(
                Y,
                Y1,
                W,
                B,
                W1,
                B1,
                (x - mean) * rstd,
                cols,
                mask,
                ZERO_CENTERED_WEIGHT,
                HAS_BIAS,
                HAS_W1,
                HAS_B1,
            )
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _weighted_dy(w, w1, DY, DY1, cols, mask, HAS_W1: tl.constexpr):
    """The gradient reaching xhat, w * dy (+ w1 * dy1), with dy and dy1 (0 without weight1)."""
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    wdy = w * dy
    dy1 = dy * 0.0
    if HAS_W1:
        dy1 = tl.load(DY1 + cols, mask=mask, other=0.0).to(tl.float32)
        wdy += w1 * dy1
    return wdy, dy, dy1


@triton.jit
def _store_input_grads(
    dh,
    DRESIDUAL_OUT,
    DX,
    DX1,
    DRESIDUAL,
    seed,
    scale,
    row,
    M,
    cols,
    mask,
    N,
    dropout_p,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
):
    """From dh, the gradient of h through the norm, write the gradients of residual, x1 and x
    (through their dropout and rowscale) for the columns cols of row. The (M, N) buffers are
    contiguous."""
    offsets = row * N + cols
    if HAS_DRESIDUAL_OUT:
        dh += tl.load(DRESIDUAL_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
    if STORE_DRESIDUAL:
        tl.store(DRESIDUAL + offsets, dh.to(DRESIDUAL.dtype.element_ty), mask=mask)
    if HAS_X1:
        dx1 = _dropped(dh, seed, row + M, cols, N, dropout_p, HAS_DROPOUT)
        tl.store(DX1 + offsets, dx1.to(DX1.dtype.element_ty), mask=mask)
    dx = _dropped(dh, seed, row, cols, N, dropout_p, HAS_DROPOUT)
    if HAS_ROWSCALE:
        dx *= scale
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_grad_terms(
    X,
    W,
    W1,
    DY,
    DY1,
    start,
    offs,
    N,
    mean,
    rstd,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    HAS_W1: tl.constexpr,
):
    """For the chunk of one row starting at column start (pointers at the row): its columns,
    their mask, xhat, w * dy (+ w1 * dy1), dy and dy1."""
    cols = start + offs
    mask = cols < N
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    w = _load_weight(W, cols, mask, ZERO_CENTERED_WEIGHT)
    w1 = w
    if HAS_W1:
        w1 = _load_weight(W1, cols, mask, ZERO_CENTERED_WEIGHT)
    wdy, dy, dy1 = _weighted_dy(w, w1, DY, DY1, cols, mask, HAS_W1)
    return cols, mask, xhat, wdy, dy, dy1


@triton.jit
def _accumulate_partial(DW, cols, mask, value):
    """Add value to this program's own row of a partial-sum buffer (no other program writes
    it, so the read-modify-write needs no atomics)."""
    tl.store(DW + cols, tl.load(DW + cols, mask=mask) + value, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (M, N) h: the forward's residual_out, or x when not stored; row stride stride_x_row
    W,
    W1,  # (N,); W1 read when HAS_W1
    DY,
    DY1,  # (M, N) contiguous gradients of y and y1; DY1 read when HAS_W1
    DRESIDUAL_OUT,  # (M, N) contiguous gradient w.r.t. residual_out; read when HAS_DRESIDUAL_OUT
    DX,  # (M, N) contiguous gradient w.r.t. x (through the dropout and rowscale)
    DX1,  # (M, N) contiguous gradient w.r.t. x1; written when HAS_X1
    DRESIDUAL,  # (M, N) contiguous gradient w.r.t. residual; written when STORE_DRESIDUAL
    Partials,  # (2 or 4, num_programs, N) fp32 per-program sums of dweight, dbias (and dweight1,
    # dbias1), zero-initialised unless SINGLE_BLOCK
    RowScale,  # (M,) read when HAS_ROWSCALE
    Mean,
    Rstd,  # (M,) fp32 from the forward
    Seed,
    stride_x_row,
    M,
    N,
    rows_per_program,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row indices: row * N may exceed 2**31 for large inputs.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    offs = tl.arange(0, BLOCK_N)
    slab = tl.num_programs(0).to(tl.int64) * N  # one (num_programs, N) slab per partial sum
    DW = Partials + pid.to(tl.int64) * N
    DB = DW + slab
    DW1 = DB + slab
    DB1 = DW1 + slab
    if SINGLE_BLOCK:
        # The weight gradients accumulate in registers over this program's rows.
        mask = offs < N
        w = _load_weight(W, offs, mask, ZERO_CENTERED_WEIGHT)
        w1 = w
        if HAS_W1:
            w1 = _load_weight(W1, offs, mask, ZERO_CENTERED_WEIGHT)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        db1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(row_start, row_end):
        x_row = X + row * stride_x_row
        mean = tl.load(Mean + row)  # 0 for RMSNorm
        rstd = tl.load(Rstd + row)
        scale = 1.0
        if HAS_ROWSCALE:
            scale = tl.load(RowScale + row).to(tl.float32)
        if SINGLE_BLOCK:
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy, dy, dy1 = _weighted_dy(w, w1, DY + row * N, DY1 + row * N, offs, mask, HAS_W1)
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS_NORM:
                dh = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dh = (wdy - (xhat * c1 + c2)) * rstd
            _store_input_grads(
                dh,
                DRESIDUAL_OUT,
                DX,
                DX1,
                DRESIDUAL,
                seed,
                scale,
                row,
                M,
                offs,
                mask,
                N,
                dropout_p,
                HAS_DRESIDUAL_OUT,
                STORE_DRESIDUAL,
                HAS_X1,
                HAS_DROPOUT,
                HAS_ROWSCALE,
            )
            dw += dy * xhat
            db += dy
            if HAS_W1:
                dw1 += dy1 * xhat
                db1 += dy1
        else:
            # Pass 1: the row sums; pass 2: the input gradients and the partial weight gradients.
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                _, _, xhat, wdy, _, _ = _chunk_grad_terms(
                    x_row,
                    W,
                    W1,
                    DY + row * N,
                    DY1 + row * N,
                    start,
                    offs,
                    N,
                    mean,
                    rstd,
                    ZERO_CENTERED_WEIGHT,
                    HAS_W1,
                )
                acc1 += xhat * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            if IS_RMS_NORM:
                c2 = c2 * 0.0
            for start in range(0, N, BLOCK_N):
                cols, cmask, xhat, wdy, dy, dy1 = _chunk_grad_terms(
                    x_row,
                    W,
                    W1,
                    DY + row * N,
                    DY1 + row * N,
                    start,
                    offs,
                    N,
                    mean,
                    rstd,
                    ZERO_CENTERED_WEIGHT,
                    HAS_W1,
                )
                dh = (wdy - (xhat * c1 + c2)) * rstd
                _store_input_grads(
                    dh,
                    DRESIDUAL_OUT,
                    DX,
                    DX1,
                    DRESIDUAL,
                    seed,
                    scale,
                    row,
                    M,
                    cols,
                    cmask,
                    N,
                    dropout_p,
                    HAS_DRESIDUAL_OUT,
                    STORE_DRESIDUAL,
                    HAS_X1,
                    HAS_DROPOUT,
                    HAS_ROWSCALE,
                )
                _accumulate_partial(DW, cols, cmask, dy * xhat)
                _accumulate_partial(DB, cols, cmask, dy)
                if HAS_W1:
                    _accumulate_partial(DW1, cols, cmask, dy1 * xhat)
                    _accumulate_partial(DB1, cols, cmask, dy1)
    if SINGLE_BLOCK:
        tl.store(DW + offs, dw, mask=mask)
        tl.store(DB + offs, db, mask=mask)
        if HAS_W1:
            tl.store(DW1 + offs, dw1, mask=mask)
            tl.store(DB1 + offs, db1, mask=mask)


@triton.jit
def _sum_partials_kernel(
    Partials,  # (2 or 4, P, N) fp32, as the backward kernel wrote them
    DW,
    DB,  # (N,) in the weight's dtype
    DW1,
    DB1,  # (N,) in weight1's dtype; written when HAS_W1
    P,
    N,
    HAS_W1: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Each program adds up BLOCK_N columns of every slab over the P program rows, in order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    slab = P.to(tl.int64) * N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p in range(P):
        row = Partials + p * N + cols
        dw += tl.load(row, mask=mask, other=0.0)
        db += tl.load(row + slab, mask=mask, other=0.0)
        if HAS_W1:
            dw1 += tl.load(row + 2 * slab, mask=mask, other=0.0)
            db1 += tl.load(row + 3 * slab, mask=mask, other=0.0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=mask)
    tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=mask)
    if HAS_W1:
        tl.store(DW1 + cols, dw1.to(DW1.dtype.element_ty), mask=mask)
        tl.store(DB1 + cols, db1.to(DB1.dtype.element_ty), mask=mask)


SUM_BLOCK = 256  # columns per program of the partial sums' reduction


@functools.cache  # called at every launch, with a few distinct sizes
def _block(N: int, max_block: int) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE_BLOCK, num_warps) for rows of N elements."""
    block = next_power_of_2(N)
    if block <= max_block:
        return block, True, min(max(block // 256, 1), 8)
    block = min(CHUNK_BLOCK, max_block)
    return block, False, min(max(block // 256, 1), 8)


def _row_layout(t: torch.Tensor | None) -> tuple[bool, int]:
    """How a launch reads t (..., N) as M rows: (copy, row stride). A tensor whose columns are
    unit-stride and whose leading dimensions collapse into one strided dimension is read in
    place; any other is copied contiguous first (row stride N). None: (False, 0)."""
    if t is None:
        return False, 0
    strides = row_strides(t)
    if strides is None or (strides[1] != 1 and t.shape[-1] > 1):
        return True, t.shape[-1]
    return False, strides[0]


def _rows_in(t: torch.Tensor | None, copy: bool) -> torch.Tensor | None:
    """t as :func:`_row_layout` said a launch reads it."""
    return t.contiguous() if copy else t


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The kernel takes a pointer for every optional tensor: a placeholder it never reads."""
    return t if t is not None else placeholder


class NormForward:
    """The forward kernel at one call signature (shapes, strides, dtypes, options): built from
    the first call's tensors (their metadata only), then called with each call's tensors.

    Args (construction; the call takes the nine tensors, None where absent):
        x: (..., N); residual, x1: x's shape or None; weight: (N,); bias: (N,) or None.
        weight1, bias1: (N,) or None: a second affine output y1 of the same normalised h.
        rowscale: x.shape[:-1] or None: x is scaled by rowscale[row] before the dropout.
        seed: (1,) int64 on x's device, required when dropout_p > 0.
        eps, dropout_p, is_rms_norm: the normalisation.
        zero_centered_weight: the affine weights are weight + 1 and weight1 + 1.
        out_dtype: dtype of y and y1 (default x's dtype).
        residual_dtype: dtype of residual_out (default x's dtype).
        store_residual_out: write h = dropout(x * rowscale) + dropout(x1) + residual.
        store_dropout_mask: write the bool keep masks of x and x1.
        max_block: rows longer than this are processed in chunks (tests lower it).
    Call returns (y, y1, residual_out, mean, rstd, keep, keep1):
        y: x's shape, contiguous, out_dtype; y1: the same, or None without weight1.
        residual_out: x's shape, contiguous, residual_dtype, or None when not stored.
        mean, rstd: (M,) fp32 for M = x.numel() // N rows (mean is 0 for RMSNorm).
        keep, keep1: x's shape, bool dropout keep masks of x and x1, or None when not stored
            (keep1 is None without x1).
    """

    def __init__(
        self,
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        rowscale,
        seed,
        *,
        eps: float,
        dropout_p: float = 0.0,
        is_rms_norm: bool = False,
        zero_centered_weight: bool = False,
        out_dtype: torch.dtype | None = None,
        residual_dtype: torch.dtype | None = None,
        store_residual_out: bool = False,
        store_dropout_mask: bool = False,
        max_block: int = MAX_BLOCK,
    ):
        self.shape, n = x.shape, x.shape[-1]
        self.rows = x.numel() // n if n else 0
        (self.copy_x, stride_x), (self.copy_x1, stride_x1), (self.copy_r, stride_r) = (
            _row_layout(x),
            _row_layout(x1),
            _row_layout(residual),
        )
        self.device = x.device
        self.out_dtype = out_dtype or x.dtype
        self.residual_dtype = (residual_dtype or x.dtype) if store_residual_out else None
        self.has_out1 = weight1 is not None
        self.keep_masks = (store_dropout_mask, store_dropout_mask and x1 is not None)
        block, single, num_warps = _block(n, max_block)
        self.launch = LaunchPlan(
            _layer_norm_fwd_kernel,
            (self.rows,),
            _FWD_TENSORS,
            stride_x_row=stride_x,
            stride_x1_row=stride_x1,
            stride_r_row=stride_r,
            M=self.rows,
            N=n,
            eps=eps,
            dropout_p=dropout_p,
            IS_RMS_NORM=is_rms_norm,
            HAS_X1=x1 is not None,
            HAS_RESIDUAL=residual is not None,
            HAS_ROWSCALE=rowscale is not None,
            HAS_BIAS=bias is not None,
            HAS_W1=weight1 is not None,
            HAS_B1=bias1 is not None,
            ZERO_CENTERED_WEIGHT=zero_centered_weight,
            HAS_DROPOUT=dropout_p > 0.0,
            STORE_RESIDUAL_OUT=store_residual_out,
            STORE_DROPOUT_MASK=store_dropout_mask,
            BLOCK_N=block,
            SINGLE_BLOCK=single,
            num_warps=num_warps,
        )

    def __call__(self, x, weight, bias, residual, x1, weight1, bias1, rowscale, seed):
        shape, device = self.shape, self.device
        y = torch.empty(shape, dtype=self.out_dtype, device=device)
        y1 = torch.empty(shape, dtype=self.out_dtype, device=device) if self.has_out1 else None
        residual_out = None
        if self.residual_dtype is not None:
            residual_out = torch.empty(shape, dtype=self.residual_dtype, device=device)
        keep = torch.empty(shape, dtype=torch.bool, device=device) if self.keep_masks[0] else None
        keep1 = torch.empty(shape, dtype=torch.bool, device=device) if self.keep_masks[1] else None
        mean = torch.empty((self.rows,), dtype=torch.float32, device=device)
        rstd = torch.empty((self.rows,), dtype=torch.float32, device=device)
        if self.rows == 0:
            return y, y1, residual_out, mean, rstd, keep, keep1
        x = _rows_in(x, self.copy_x)
        with device_guard(x):
            self.launch(
                x,
                _rows_in(x1, self.copy_x1) if x1 is not None else x,
                _rows_in(residual, self.copy_r) if residual is not None else x,
                weight.contiguous(),
                bias.contiguous() if bias is not None else y,
                weight1.contiguous() if weight1 is not None else y,
                bias1.contiguous() if bias1 is not None else y,
                y,
                _or(y1, y),
                _or(residual_out, y),
                _or(keep, y),
                _or(keep1, y),
                rowscale.contiguous() if rowscale is not None else mean,
                mean,
                rstd,
                _or(seed, mean),
            )
        return y, y1, residual_out, mean, rstd, keep, keep1


_FWD_TENSORS = (
    "X",
    "X1",
    "R",
    "W",
    "B",
    "W1",
    "B1",
    "Y",
    "Y1",
    "RESIDUAL_OUT",
    "KEEP",
    "KEEP1",
    "RowScale",
    "Mean",
    "Rstd",
    "Seed",
)


@functools.cache  # the device's properties, read once rather than at every backward
def _max_programs(device: torch.device) -> int:
    if device.type == "cuda" and not interpreter_enabled():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one after another: a few suffice to exercise the reduction.
    return 4


class NormBackward:
    """The backward kernels at one call signature: the input gradients with per-program
    weight-gradient sums, then the sums of those in order. Built from the metadata of the
    forward's (see :class:`NormForward`); called with each backward's tensors.

    Args (construction):
        h: (..., N) the normalised input: the forward's residual_out when it stored one, else its
            x. weight: (N,); weight1: (N,) or None.
        has_dresidual_out: the calls pass the gradient of residual_out (prenorm).
        has_rowscale, dropout_p, zero_centered_weight, is_rms_norm: as given to the forward.
        x_dtype: dtype of dx (default h's).
        x1_dtype: dtype of dx1; None when the forward had no x1.
        residual_dtype: dtype of the residual gradient; None when there was no residual.
        share_dx: return dx itself as the residual's gradient where the two are equal (no
            dropout, no rowscale, residual_dtype x_dtype): one tensor written instead of two.
            For autograd's eager path only (a custom op's outputs may not alias).
        max_block: as for the forward.
    Call (dy, dy1, h, weight, weight1, mean, rstd, dresidual_out, rowscale, seed): dy, dy1,
    dresidual_out of h's shape (any layout: they are made contiguous), dy1 None without weight1,
    dresidual_out None unless has_dresidual_out; the others as given to the forward and
    returned by it. Returns (dx, dweight, dbias, dresidual, dx1, dweight1, dbias1): dx h's shape,
    through the dropout and rowscale; dweight, dbias (N,) in weight's dtype (dbias whether or
    not there was a bias); dresidual h's shape in residual_dtype, or None; dx1 in x1_dtype, or
    None; dweight1, dbias1 (N,) in weight1's dtype, or None without weight1.
    """

    def __init__(
        self,
        h,
        weight,
        weight1,
        *,
        has_dresidual_out: bool,
        has_rowscale: bool = False,
        dropout_p: float = 0.0,
        zero_centered_weight: bool = False,
        is_rms_norm: bool = False,
        x_dtype: torch.dtype | None = None,
        x1_dtype: torch.dtype | None = None,
        residual_dtype: torch.dtype | None = None,
        share_dx: bool = False,
        max_block: int = MAX_BLOCK,
    ):
        self.shape, n = h.shape, h.shape[-1]
        self.rows = h.numel() // n if n else 0
        self.copy_h, stride_h = _row_layout(h)
        self.device = h.device
        self.x_dtype, self.x1_dtype = x_dtype or h.dtype, x1_dtype
        self.residual_dtype = residual_dtype
        # dh/dresidual = dh = dh/dx where nothing scales or drops x on its way into h.
        self.share_dx = share_dx and (
            residual_dtype == self.x_dtype and dropout_p == 0.0 and not has_rowscale
        )
        programs = _max_programs(h.device) if self.rows else 1
        programs = max(1, min(self.rows, programs))
        block, single, num_warps = _block(n, max_block)
        # A single-block kernel writes every program's partial row; a chunked one adds into them.
        self.new_partials = torch.empty if single else torch.zeros
        self.partials_shape = (4 if weight1 is not None else 2, programs, n)
        self.has_w1 = weight1 is not None
        self.input_grads = LaunchPlan(
            _layer_norm_bwd_kernel,
            (programs,),
            _BWD_TENSORS,
            stride_x_row=stride_h,
            M=self.rows,
            N=n,
            rows_per_program=cdiv(self.rows, programs),
            dropout_p=dropout_p,
            IS_RMS_NORM=is_rms_norm,
            HAS_W1=weight1 is not None,
            HAS_X1=x1_dtype is not None,
            HAS_ROWSCALE=has_rowscale,
            ZERO_CENTERED_WEIGHT=zero_centered_weight,
            HAS_DROPOUT=dropout_p > 0.0,
            HAS_DRESIDUAL_OUT=has_dresidual_out,
            STORE_DRESIDUAL=residual_dtype is not None and not self.share_dx,
            BLOCK_N=block,
            SINGLE_BLOCK=single,
            num_warps=num_warps,
        )
        self.sum_partials = LaunchPlan(
            _sum_partials_kernel,
            (cdiv(n, SUM_BLOCK),),
            ("Partials", "DW", "DB", "DW1", "DB1"),
            P=programs,
            N=n,
            HAS_W1=weight1 is not None,
            BLOCK_N=SUM_BLOCK,
            num_warps=2,
        )

    def __call__(self, dy, dy1, h, weight, weight1, mean, rstd, dresidual_out, rowscale, seed):
        shape, device = self.shape, self.device
        dy = contiguous_aligned(dy)
        dy1 = contiguous_aligned(dy1) if dy1 is not None else None
        dresidual_out = contiguous_aligned(dresidual_out) if dresidual_out is not None else None
        dx = torch.empty(shape, dtype=self.x_dtype, device=device)
        dx1 = torch.empty(shape, dtype=self.x1_dtype, device=device) if self.x1_dtype else None
        dresidual = None
        if self.share_dx:
            dresidual = dx
        elif self.residual_dtype is not None:
            dresidual = torch.empty(shape, dtype=self.residual_dtype, device=device)
        # Separate tensors, not views of one: a custom op's outputs may not alias each other.
        new_grad = torch.empty_like if self.rows else torch.zeros_like
        dweight, dbias = new_grad(weight), new_grad(weight)
        dweight1 = dbias1 = None
        if self.has_w1:
            dweight1, dbias1 = new_grad(weight1), new_grad(weight1)
        if self.rows == 0:
            return dx, dweight, dbias, dresidual, dx1, dweight1, dbias1
        partials = self.new_partials(self.partials_shape, dtype=torch.float32, device=device)
        with device_guard(dy):
            self.input_grads(
                _rows_in(h, self.copy_h),
                weight.contiguous(),
                weight1.contiguous() if weight1 is not None else dx,
                dy,
                _or(dy1, dy),
                _or(dresidual_out, dy),
                dx,
                _or(dx1, dx),
                _or(dresidual, dx),
                partials,
                rowscale.contiguous() if rowscale is not None else mean,
                mean,
                rstd,
                _or(seed, mean),
            )
            self.sum_partials(partials, dweight, dbias, _or(dweight1, dweight), _or(dbias1, dbias))
        return dx, dweight, dbias, dresidual, dx1, dweight1, dbias1


_BWD_TENSORS = (
    "X",
    "W",
    "W1",
    "DY",
    "DY1",
    "DRESIDUAL_OUT",
    "DX",
    "DX1",
    "DRESIDUAL",
    "Partials",
    "RowScale",
    "Mean",
    "Rstd",
    "Seed",
)

# -- the launches as functions, one plan per call signature ------------------------------------

_forward_plans, _backward_plans = PlanCache(), PlanCache()


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    out_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    store_residual_out: bool = False,
    store_dropout_mask: bool = False,
    max_block: int = MAX_BLOCK,
):
    """The forward launch of :class:`NormForward` for these tensors and options (its arguments
    and return value), through a plan kept per call signature. Inputs are assumed validated
    (see ``flash_attn.ops.layer_norm``)."""
    tensors = (x, weight, bias, residual, x1, weight1, bias1, rowscale, seed)
    options = dict(
        eps=eps,
        dropout_p=dropout_p,
        is_rms_norm=is_rms_norm,
        zero_centered_weight=zero_centered_weight,
        out_dtype=out_dtype,
        residual_dtype=residual_dtype,
        store_residual_out=store_residual_out,
        store_dropout_mask=store_dropout_mask,
        max_block=max_block,
    )
    key = call_signature(tensors, tuple(options.values()))
    plan = _forward_plans.get(key) or _forward_plans.keep(key, NormForward(*tensors, **options))
    return plan(*tensors)


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dresidual_out: torch.Tensor | None = None,
    dy1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    rowscale: torch.Tensor | None = None,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    x_dtype: torch.dtype | None = None,
    x1_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    max_block: int = MAX_BLOCK,
):
    """The backward launches of :class:`NormBackward` (x is its h) for these tensors and
    options, through a plan kept per call signature; returns what the plan returns."""
    options = dict(
        has_dresidual_out=dresidual_out is not None,
        has_rowscale=rowscale is not None,
        dropout_p=dropout_p,
        zero_centered_weight=zero_centered_weight,
        is_rms_norm=is_rms_norm,
        x_dtype=x_dtype,
        x1_dtype=x1_dtype,
        residual_dtype=residual_dtype,
        max_block=max_block,
    )
    key = call_signature((x, weight, weight1), tuple(options.values()))
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans.keep(key, NormBackward(x, weight, weight1, **options))
    return plan(dy, dy1, x, weight, weight1, mean, rstd, dresidual_out, rowscale, seed)
