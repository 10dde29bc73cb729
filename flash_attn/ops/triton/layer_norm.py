"""LayerNorm / RMSNorm fused with dropout and a residual add, forward and backward, in Triton.

One program normalises one row of x (M, N): it applies dropout to x, adds the residual, writes
that sum (``residual_out``) when asked, and normalises it. Rows up to ``MAX_BLOCK`` elements
stay in registers for the whole program; longer rows are walked in chunks of ``CHUNK_BLOCK``,
re-reading x three times (sum, centred sum of squares, output) instead of holding it.

Numerics: statistics and the affine transform are computed in fp32 whatever the input dtype;
the variance is the mean of squared deviations from the mean (two passes, no E[x^2] - E[x]^2
cancellation). Mean and rstd are stored in fp32 for the backward.

Dropout draws from Philox keyed by a seed tensor and the element's flat index row * N + col, so
the backward regenerates the mask instead of storing it. The backward splits rows among a few
programs; each sums dweight and dbias over its rows into its own row of an fp32 partial buffer,
and the launcher adds those rows up: no atomics, so it is bit-reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.triton.launch import device_guard

# Rows longer than this are processed in chunks (64 KiB of fp64 would not fit; 8192 fp32 does).
MAX_BLOCK = 8192
CHUNK_BLOCK = 4096


@triton.jit
def _dropout_add(
    X, R, seed, row, cols, mask, N, dropout_p, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr
):
    """fp32 dropout(x) + residual for the columns cols of one row (X, R point at the row)."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, row.to(tl.int64) * N + cols) >= dropout_p
        x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RESIDUAL:
        x += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N), row stride stride_x_row, unit column stride
    R,  # (M, N) residual, row stride stride_r_row; read when HAS_RESIDUAL
    W,
    B,  # (N,) weight; (N,) bias, read when HAS_BIAS
    Y,  # (M, N) contiguous output
    RESIDUAL_OUT,  # (M, N) contiguous dropout(x) + residual; written when STORE_RESIDUAL_OUT
    Mean,
    Rstd,  # (M,) fp32; Mean is 0 for RMSNorm
    Seed,  # (1,) int64, read when HAS_DROPOUT
    stride_x_row,
    stride_r_row,
    N,
    eps,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    X += row64 * stride_x_row
    R += row64 * stride_r_row
    Y += row64 * N
    RESIDUAL_OUT += row64 * N
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    offs = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        # The whole row stays in registers: one read of x, one write of y.
        mask = offs < N
        x = _dropout_add(X, R, seed, row, offs, mask, N, dropout_p, HAS_RESIDUAL, HAS_DROPOUT)
        if STORE_RESIDUAL_OUT:
            tl.store(RESIDUAL_OUT + offs, x.to(RESIDUAL_OUT.dtype.element_ty), mask=mask)
        if IS_RMS_NORM:
            var = tl.sum(x * x, axis=0) / N
            mean = var * 0.0
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = (x - mean) * rstd * tl.load(W + offs, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + offs, mask=mask).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Chunked: x is recomputed from X and R (the dropout mask is deterministic) on every
        # pass rather than read back from RESIDUAL_OUT, which may be rounded to a lower dtype.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = _dropout_add(X, R, seed, row, cols, mask, N, dropout_p, HAS_RESIDUAL, HAS_DROPOUT)
            if STORE_RESIDUAL_OUT:
                tl.store(RESIDUAL_OUT + cols, x.to(RESIDUAL_OUT.dtype.element_ty), mask=mask)
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
                x = _dropout_add(
                    X, R, seed, row, cols, mask, N, dropout_p, HAS_RESIDUAL, HAS_DROPOUT
                )
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            var = tl.sum(acc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = _dropout_add(X, R, seed, row, cols, mask, N, dropout_p, HAS_RESIDUAL, HAS_DROPOUT)
            y = (x - mean) * rstd * tl.load(W + cols, mask=mask).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _dx_chunk(
    X, W, DY, DRESIDUAL_OUT, cols, mask, mean, rstd, c1, c2, HAS_DRESIDUAL_OUT: tl.constexpr
):
    """Gradient w.r.t. the normalised input for columns cols, given the row sums c1, c2.

    Also returns xhat and dy for the weight and bias gradients.
    """
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = w * dy
    # c2 = mean(w * dy) is 0 for RMSNorm (no centring), passed as such by the caller.
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DRESIDUAL_OUT:
        dx += tl.load(DRESIDUAL_OUT + cols, mask=mask, other=0.0).to(tl.float32)
    return dx, xhat, dy


@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (M, N) the normalised input (x, or the forward's residual_out), row stride stride_x_row
    W,  # (N,)
    DY,  # (M, N) contiguous
    DRESIDUAL_OUT,  # (M, N) contiguous gradient w.r.t. residual_out; read when HAS_DRESIDUAL_OUT
    DX,  # (M, N) contiguous gradient w.r.t. x (through the dropout)
    DRESIDUAL,  # (M, N) contiguous gradient w.r.t. residual; written when STORE_DRESIDUAL
    DW,
    DB,  # (num_programs, N) fp32 per-program partial sums, zero-initialised
    Mean,
    Rstd,  # (M,) fp32 from the forward
    Seed,
    stride_x_row,
    M,
    N,
    rows_per_program,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
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
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        # dweight and dbias accumulate in registers over this program's rows.
        mask = offs < N
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(row_start, row_end):
        row64 = row
        x_row = X + row64 * stride_x_row
        dy_row = DY + row64 * N
        dres_out_row = DRESIDUAL_OUT + row64 * N
        mean = tl.load(Mean + row)  # 0 for RMSNorm
        rstd = tl.load(Rstd + row)
        if SINGLE_BLOCK:
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS_NORM:
                dx = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DRESIDUAL_OUT:
                dx += tl.load(dres_out_row + offs, mask=mask, other=0.0).to(tl.float32)
            dw += dy * xhat
            db += dy
            if STORE_DRESIDUAL:
                tl.store(DRESIDUAL + row64 * N + offs, dx.to(DRESIDUAL.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                keep = tl.rand(seed, row64 * N + offs) >= dropout_p
                dx = tl.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0)
            tl.store(DX + row64 * N + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            # Pass 1: the row sums; pass 2: dx, and the partial dweight/dbias in global memory
            # (this program's own row of DW/DB, so the read-modify-write needs no atomics).
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                cmask = cols < N
                x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
                wdy = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) * dy
                acc1 += tl.where(cmask, (x - mean) * rstd, 0.0) * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            if IS_RMS_NORM:
                c2 = c2 * 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                cmask = cols < N
                dx, xhat, dy = _dx_chunk(
                    x_row,
                    W,
                    dy_row,
                    dres_out_row,
                    cols,
                    cmask,
                    mean,
                    rstd,
                    c1,
                    c2,
                    HAS_DRESIDUAL_OUT,
                )
                tl.store(DW + cols, tl.load(DW + cols, mask=cmask) + dy * xhat, mask=cmask)
                tl.store(DB + cols, tl.load(DB + cols, mask=cmask) + dy, mask=cmask)
                if STORE_DRESIDUAL:
                    tl.store(
                        DRESIDUAL + row64 * N + cols, dx.to(DRESIDUAL.dtype.element_ty), mask=cmask
                    )
                if HAS_DROPOUT:
                    keep = tl.rand(seed, row64 * N + cols) >= dropout_p
                    dx = tl.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0)
                tl.store(DX + row64 * N + cols, dx.to(DX.dtype.element_ty), mask=cmask)
    if SINGLE_BLOCK:
        tl.store(DW + offs, dw, mask=mask)
        tl.store(DB + offs, db, mask=mask)


def _block(N: int, max_block: int) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE_BLOCK, num_warps) for rows of N elements."""
    block = triton.next_power_of_2(N)
    if block <= max_block:
        return block, True, min(max(block // 256, 1), 8)
    block = min(CHUNK_BLOCK, max_block)
    return block, False, min(max(block // 256, 1), 8)


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    """A (M, N) tensor whose columns are unit-stride (rows may have any stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _seed_arg(seed, device):
    return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    is_rms_norm: bool = False,
    residual_dtype: torch.dtype | None = None,
    store_residual_out: bool = False,
    max_block: int = MAX_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are assumed validated (see ``flash_attn.ops.layer_norm``).

    Args:
        x: (M, N); residual: (M, N) or None; weight: (N,); bias: (N,) or None.
        seed: (1,) int64 on x's device, required when dropout_p > 0.
        residual_dtype: dtype of residual_out (default x's dtype).
        store_residual_out: write dropout(x) + residual to residual_out.
        max_block: rows longer than this are processed in chunks (tests lower it).
    Returns:
        y: (M, N) contiguous, x's dtype.
        residual_out: (M, N) contiguous in residual_dtype, or None when not stored.
        mean, rstd: (M,) fp32 (mean is 0 for RMSNorm).
    """
    M, N = x.shape
    x = _rows_2d(x)
    residual = _rows_2d(residual) if residual is not None else None
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    residual_out = None
    if store_residual_out:
        residual_out = torch.empty((M, N), dtype=residual_dtype or x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, residual_out, mean, rstd
    block, single, num_warps = _block(N, max_block)
    with device_guard(x):
        _layer_norm_fwd_kernel[(M,)](
            x,
            residual if residual is not None else x,
            weight,
            bias if bias is not None else weight,
            y,
            residual_out if residual_out is not None else y,
            mean,
            rstd,
            _seed_arg(seed, x.device),
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            N,
            eps,
            dropout_p,
            IS_RMS_NORM=is_rms_norm,
            HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            HAS_DROPOUT=dropout_p > 0.0,
            STORE_RESIDUAL_OUT=store_residual_out,
            BLOCK_N=block,
            SINGLE_BLOCK=single,
            num_warps=num_warps,
        )
    return y, residual_out, mean, rstd


def _num_programs(M: int, device: torch.device) -> int:
    if device.type == "cuda" and not interpreter_enabled():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(M, 2 * sms))
    # The interpreter runs programs one after another: a few suffice to exercise the reduction.
    return max(1, min(M, 4))


def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, dresidual_out: torch.Tensor | None = None, dropout_p: float = 0.0,
    seed: torch.Tensor | None = None, is_rms_norm: bool = False,
    residual_dtype: torch.dtype | None = None, max_block: int = MAX_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Launch the backward kernel.

    Args:
        dy: (M, N) gradient of y. x: (M, N) the normalised input, i.e. the forward's residual_out
            when it stored one, else its x. mean, rstd: the forward's (M,) fp32 statistics.
        dresidual_out: (M, N) gradient of residual_out (prenorm), or None.
        dropout_p, seed, is_rms_norm: as given to the forward.
        residual_dtype: dtype of the residual gradient to return; None when there is no residual.
    Returns:
        dx: (M, N) in dy's dtype, through the dropout. dweight, dbias: (N,) in weight's dtype
        (dbias is the bias gradient whether or not there was a bias). dresidual: (M, N) in
        residual_dtype, or None.
    """
    M, N = x.shape
    x = _rows_2d(x)
    dy = dy.contiguous()
    if dresidual_out is not None:
        dresidual_out = dresidual_out.contiguous()
    dx = torch.empty((M, N), dtype=dy.dtype, device=dy.device)
    dresidual = None
    if residual_dtype is not None:
        dresidual = torch.empty((M, N), dtype=residual_dtype, device=dy.device)
    programs = _num_programs(M, x.device)
    dw_partial = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    db_partial = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    if M > 0:
        block, single, num_warps = _block(N, max_block)
        with device_guard(x):
            _layer_norm_bwd_kernel[(programs,)](
                x,
                weight,
                dy,
                dresidual_out if dresidual_out is not None else dy,
                dx,
                dresidual if dresidual is not None else dx,
                dw_partial,
                db_partial,
                mean,
                rstd,
                _seed_arg(seed, x.device),
                x.stride(0),
                M,
                N,
                triton.cdiv(M, programs),
                dropout_p,
                IS_RMS_NORM=is_rms_norm,
                HAS_DROPOUT=dropout_p > 0.0,
                HAS_DRESIDUAL_OUT=dresidual_out is not None,
                STORE_DRESIDUAL=dresidual is not None,
                BLOCK_N=block,
                SINGLE_BLOCK=single,
                num_warps=num_warps,
            )
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype)
    return dx, dweight, dbias, dresidual
