"""FlashAttention-2 backward in Triton and its launcher.

First the paper's D_i = rowsum(dO * O) (``_attn_bwd_preprocess_kernel``), then one of two
schedules, as the official ``deterministic`` flag picks:

- ``deterministic=False`` (the official default): one program per key block of a key/value
  head computes, for each tile of queries, S = q k^T and dP = dO v^T, then dV += P^T dO,
  dK += dS^T q and dQ += dS k: five matrix products per tile pair. dQ is summed over the key
  blocks in an fp32 buffer by atomic adds (the preprocessing kernel zeroes it), then scaled and
  cast once (``_attn_bwd_dq_finish_kernel``). The adds land in an order that varies from run to
  run, so dQ may differ in its last bits between runs.
- ``deterministic=True``: the same dK/dV pass without dQ, then one program per query block
  recomputes S and dP to sum its dQ in registers (seven products per tile pair). Every program
  owns what it writes, so the backward is bit-reproducible.

In both, a dK/dV program sums over every query head of its key/value head's group, so dK and
dV are written once, without atomics. Probabilities are recomputed from the saved log-sum-exp,
the dropout mask from its seed. Shapes, score modifiers and masking: see ``forward.py`` beside
this file.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.triton.forward import (
    KERNEL_TENSORS,
    LOG2E,
    Dropout,
    block_indices,
    contiguous_strides,
    dropout_keep,
    head_start,
    heavy_last,
    kernel_constants,
    kernel_tensors,
    key_range,
    lse_shape,
    lse_strides_of,
    program_block,
    query_block,
    score_mods,
    scores,
    sequence,
    token_strides,
    token_strides_of,
)
from flash_attn.ops.attention.triton.tuning import kernel_config
from flash_attn.ops.launch import LaunchPlan, cdiv, device_guard
from flash_attn.ops.plans import contiguous_aligned


class Queries(NamedTuple):
    """Where the dK/dV loop reads the rows of one query head (see ``_attn_bwd_dkdv_inner``)."""

    q_base: tl.tensor
    do_base: tl.tensor
    dq_base: tl.tensor  # the head's rows of DQAccum, laid out like dO; read when ATOMIC_DQ
    Lse: tl.tensor
    Delta: tl.tensor
    lse_base: tl.tensor  # the head's first entry in Lse and Delta
    stride_qm: tl.tensor
    stride_om: tl.tensor  # dO's token stride, and DQAccum's
    in_dim: tl.tensor  # (HEAD_DIM,) bool: the columns inside the head dim


class ScoreGrads(NamedTuple):
    """Where a program stores the gradient of the scores (dBias) of one head."""

    DBias: tl.tensor  # (B, H, max_Sq, max_Sk) fp32
    base: tl.tensor  # the head's first element
    max_seqlen_k: tl.tensor


@triton.jit
def _store_dbias(dbias, ds, rows, cols, seqlen_q, seqlen_k):
    """Store the tile ds of score gradients into dbias (a :class:`ScoreGrads`); rows and cols
    broadcast along the tile as in :func:`scores`."""
    offsets = rows.to(tl.int64) * dbias.max_seqlen_k + cols
    tl.store(dbias.DBias + dbias.base + offsets, ds, mask=(rows < seqlen_q) & (cols < seqlen_k))


@triton.jit
def _row_tile(
    stride_o,
    stride_lse,
    CuSeqlensQ,
    nheads,
    seqlen_q,
    head_dim,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """(offsets, mask, lse_offsets, in_rows): the BLOCK_M rows this program owns (see
    :func:`program_block`) in a tensor laid out like the contiguous output (token strides
    ``stride_o``), and their entries in one laid out like Lse (strides ``stride_lse``)."""
    start_m, _, off_b, off_h = program_block(BLOCK_M, nheads, False)
    lengths = (CuSeqlensQ, CuSeqlensQ, CuSeqlensQ)
    q_start, seqlen_q, _, _ = sequence(lengths, off_b, seqlen_q, 0, VARLEN, False)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_rows = rows < seqlen_q
    mask = in_rows[:, None] & (offs_d[None, :] < head_dim)
    offsets = head_start(0, stride_o, off_b, off_h, q_start) + rows[:, None] * stride_o[1]
    lse_offsets = off_b * stride_lse[0] + off_h * stride_lse[1] + q_start + rows
    return offsets + offs_d[None, :], mask, lse_offsets, in_rows


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # like Q, contiguous
    DO,  # like Out
    Delta,  # like Lse
    DQAccum,  # like Out, fp32: zeroed when ZERO_DQ
    CuSeqlensQ,
    stride_o,  # (batch, token, head)
    stride_lse,  # (batch, head)
    nheads,
    seqlen_q,
    head_dim,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    ZERO_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), and, with ZERO_DQ, zeros where the dK/dV kernel adds dQ."""
    offsets, mask, lse_offsets, in_rows = _row_tile(
        stride_o, stride_lse, CuSeqlensQ, nheads, seqlen_q, head_dim, HEAD_DIM, VARLEN, BLOCK_M
    )
    o = tl.load(Out + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + lse_offsets, tl.sum(o * do, 1), mask=in_rows)
    if ZERO_DQ:
        tl.store(DQAccum + offsets, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=mask)


@triton.jit
def _attn_bwd_dq_finish_kernel(
    DQAccum,  # like Out, fp32
    DQ,  # like Out
    CuSeqlensQ,
    stride_o,
    stride_lse,
    softmax_scale,
    nheads,
    seqlen_q,
    head_dim,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dQ = DQAccum * softmax_scale in dQ's dtype."""
    offsets, mask, _, _ = _row_tile(
        stride_o, stride_lse, CuSeqlensQ, nheads, seqlen_q, head_dim, HEAD_DIM, VARLEN, BLOCK_M
    )
    dq = tl.load(DQAccum + offsets, mask=mask, other=0.0)
    tl.store(DQ + offsets, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _tile_grads(
    qk,
    dp,
    lse,
    delta,
    rows,
    cols,
    start_n,
    mods,
    dropout,
    FEATURES: tl.constexpr,
    MASKED: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """From a tile's q k^T and dO v^T (or, TRANSPOSED, their transposes k q^T and v dO^T): the
    weights that multiplied V (p after dropout), dS (the gradient of the scores, = dBias) and dS
    scaled back through the softcap (for dQ and dK). lse (log2 units), delta, rows and cols
    broadcast along the tile as in :func:`scores`; mods and dropout: the tuples of
    ``score_mods`` and ``query_block``; FEATURES: see ``forward.py``."""
    s, dsoftcap = scores(qk, rows, cols, mods, FEATURES, MASKED)
    # Padding rows read lse = +inf, so their probabilities are exactly 0.
    p = tl.math.exp2(s - lse)
    p_dropped = p
    if FEATURES.DROPOUT:
        keep = dropout_keep(dropout, rows, start_n, BLOCK_N, TRANSPOSED)
        scale = 1.0 / (1.0 - dropout.dropout_p)
        p_dropped = tl.where(keep, p * scale, 0.0)
        dp = tl.where(keep, dp * scale, 0.0)
    ds = p * (dp - delta)
    if MASKED:
        # a masked score's p is exactly 0, but dp may be NaN there (garbage in a masked key's
        # v): 0 * NaN must not reach dK or dQ. Where p is 0 for a visible score, ds is 0 too.
        ds = tl.where(p == 0.0, 0.0, ds)
    if FEATURES.SOFTCAP:
        return p_dropped, ds, ds * dsoftcap
    return p_dropped, ds, ds


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    k_dq,
    v,
    queries,
    cols,
    start_n,
    mods,
    dropout,
    dbias,
    lo,
    hi,
    FEATURES: tl.constexpr,
    MASKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK and dV of one key block summed over query blocks [lo, hi) of one head, on transposed
    tiles (keys x queries): k q^T and v dO^T put the keys first, so p^T and dS^T are the
    register operands of dV += p^T dO and dK += dS^T q, as the tensor cores want them. With
    ATOMIC_DQ each tile also adds its dS k (k_dq: k with non-finite keys zeroed where a mask may
    hide them) to the query rows' dQ, and with DBIAS stores its dS into dbias (a
    :class:`ScoreGrads`). queries: a :class:`Queries`. Without MASKED every score is visible."""
    seqlen_q = mods.seqlen_q
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = queries.in_dim
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows, in_rows = block_indices(start_m, seqlen_q, BLOCK_M, MASKED, FEATURES.EVEN_M)
        row_mask = in_rows[:, None] & in_dim[None, :]
        qT = tl.load(
            queries.q_base + rows[None, :] * queries.stride_qm + offs_d[:, None],
            mask=in_rows[None, :] & in_dim[:, None],
            other=0.0,
        )
        row_offsets = rows[:, None] * queries.stride_om + offs_d[None, :]
        do = tl.load(queries.do_base + row_offsets, mask=row_mask, other=0.0)
        lse_ptrs = queries.Lse + queries.lse_base + rows
        lse = tl.load(lse_ptrs, mask=in_rows, other=float("inf")) * LOG2E
        delta = tl.load(queries.Delta + queries.lse_base + rows, mask=in_rows, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        pT, ds_scores, dsT = _tile_grads(
            qkT,
            dpT,
            lse[None, :],
            delta[None, :],
            rows[None, :],
            cols[:, None],
            start_n,
            mods,
            dropout,
            FEATURES,
            MASKED,
            True,
            BLOCK_N,
        )
        dsT = dsT.to(qT.dtype)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k_dq, input_precision=DOT_PRECISION)
            tl.atomic_add(queries.dq_base + row_offsets, dq, mask=row_mask, sem="relaxed")
        if DBIAS:
            _store_dbias(dbias, ds_scores, rows[None, :], cols[:, None], seqlen_q, mods.seqlen_k)
    return dk, dv


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    rows,
    keys,
    mods,
    dropout,
    dbias,
    lo,
    hi,
    FEATURES: tl.constexpr,
    MASKED: tl.constexpr,
    DBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query block summed over key blocks [lo, hi); stores dBias tiles into dbias (a
    :class:`ScoreGrads`) when DBIAS. keys: (k_base, v_base, stride_kn, stride_vn, in_dim).
    Without MASKED every score is visible."""
    k_base, v_base, stride_kn, stride_vn, in_dim = keys
    seqlen_q, seqlen_k = mods.seqlen_q, mods.seqlen_k
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols, in_keys = block_indices(start_n, seqlen_k, BLOCK_N, MASKED, FEATURES.EVEN_N)
        kv_mask = in_keys[None, :] & in_dim[:, None]
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None], mask=kv_mask, other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        _, ds_scores, ds = _tile_grads(
            qk,
            dp,
            lse[:, None],
            delta[:, None],
            rows[:, None],
            cols[None, :],
            start_n,
            mods,
            dropout,
            FEATURES,
            MASKED,
            False,
            BLOCK_N,
        )
        if MASKED:  # a masked key's ds is 0, and 0 * (NaN or inf in its k) must stay 0
            kT = tl.where((kT - kT) == 0, kT, 0.0)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
        if DBIAS:
            _store_dbias(dbias, ds_scores, rows[:, None], cols[None, :], seqlen_q, seqlen_k)
    return dq


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,  # DO like Out; DK, DV like K, contiguous
    DQAccum,  # like Out, fp32, zeroed: dQ / softmax_scale is added here when ATOMIC_DQ
    DBias,  # (B, H, max_Sq, max_Sk) fp32, written when DBIAS
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_dk,
    stride_lse,  # as in the forward
    CuSeqlensQ,
    CuSeqlensK,
    SeqlensK,  # as in the forward
    Bias,
    Slopes,
    scoring,  # as in the forward
    Seed,
    dropout_p,
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    seqlen_q_bucket,
    seqlen_k_bucket,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQLENS_K: tl.constexpr,
    FEATURES: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_N keys of one key/value head and sums over every query head of
    # its group, so dK and dV are written once, without atomics.
    lengths = (CuSeqlensQ, CuSeqlensK, SeqlensK)
    # With the roles swapped, the window's parts trade places.
    window_left, window_right = scoring.window_left, scoring.window_right
    order = heavy_last(window_right, window_left)
    start_n, _, off_b, off_hk = program_block(BLOCK_N, nheads_k, order)
    group_size = nheads // nheads_k
    max_seqlen_q = seqlen_q
    max_seqlen_k = seqlen_k
    q_start, seqlen_q, k_start, seqlen_k = sequence(
        lengths, off_b, seqlen_q, seqlen_k, VARLEN, HAS_SEQLENS_K
    )
    if start_n >= seqlen_k:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    kv_mask = (cols[:, None] < seqlen_k) & in_dim[None, :]
    k_ptrs = head_start(K, stride_k, off_b, off_hk, k_start) + cols[:, None] * stride_k[1]
    v_ptrs = head_start(V, stride_v, off_b, off_hk, k_start) + cols[:, None] * stride_v[1]
    k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    k_dq = k
    if ATOMIC_DQ and FEATURES.MASK_WINDOW:
        # A masked key's dS is 0, and 0 * (NaN or inf in its k) must not reach dQ.
        k_dq = tl.where((k - k) == 0, k, 0.0)
    seed = 0
    if FEATURES.DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query blocks that see none of these keys (causal, window) are skipped, and those that see
    # all of them skip the masks: the key range of this key block with the roles swapped.
    lo, lo_full, hi_full, hi = key_range(
        start_n, seqlen_k, seqlen_q, window_right, window_left, BLOCK_N, BLOCK_M
    )
    for g in range(0, group_size):
        off_h = off_hk * group_size + g
        queries = Queries(
            head_start(Q, stride_q, off_b, off_h, q_start),
            head_start(DO, stride_o, off_b, off_h, q_start),
            head_start(DQAccum, stride_o, off_b, off_h, q_start),
            Lse,
            Delta,
            off_b * stride_lse[0] + off_h * stride_lse[1] + q_start,
            stride_q[1],
            stride_o[1],
            in_dim,
        )
        bh = off_b * nheads + off_h
        dbias = ScoreGrads(DBias, bh.to(tl.int64) * max_seqlen_q * max_seqlen_k, max_seqlen_k)
        mods = score_mods(
            Bias, Slopes, scoring, off_b, off_h, seqlen_q, seqlen_k, FEATURES.HAS_ALIBI
        )
        dropout = Dropout(seed, bh, max_seqlen_q, max_seqlen_k, dropout_p)
        dk, dv = _attn_bwd_dkdv_inner(
            dk,
            dv,
            k,
            k_dq,
            v,
            queries,
            cols,
            start_n,
            mods,
            dropout,
            dbias,
            lo_full,
            hi_full,
            FEATURES,
            False,
            ATOMIC_DQ,
            DBIAS,
            DOT_PRECISION,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_N,
        )
        # With the roles swapped, the window's left edge (or the last queries) masks the last
        # query blocks, its right edge (causal: the diagonal) the first ones.
        if FEATURES.MASK_LEFT or not FEATURES.EVEN_M:
            dk, dv = _attn_bwd_dkdv_inner(
                dk,
                dv,
                k,
                k_dq,
                v,
                queries,
                cols,
                start_n,
                mods,
                dropout,
                dbias,
                hi_full,
                hi,
                FEATURES,
                True,
                ATOMIC_DQ,
                DBIAS,
                DOT_PRECISION,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_N,
            )
        if FEATURES.MASK_WINDOW:
            dk, dv = _attn_bwd_dkdv_inner(
                dk,
                dv,
                k,
                k_dq,
                v,
                queries,
                cols,
                start_n,
                mods,
                dropout,
                dbias,
                lo,
                lo_full,
                FEATURES,
                True,
                ATOMIC_DQ,
                DBIAS,
                DOT_PRECISION,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_N,
            )

    dk = dk * scoring.softmax_scale
    out_offs = head_start(0, stride_dk, off_b, off_hk, k_start) + cols[:, None] * stride_dk[1]
    out_offs += offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,  # DQ like Out, contiguous
    DBias,  # (B, H, max_Sq, max_Sk) fp32, written when DBIAS
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_lse,  # as in the forward
    CuSeqlensQ,
    CuSeqlensK,
    SeqlensK,  # as in the forward
    Bias,
    Slopes,
    scoring,  # as in the forward
    Seed,
    dropout_p,
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    seqlen_q_bucket,
    seqlen_k_bucket,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQLENS_K: tl.constexpr,
    FEATURES: tl.constexpr,
    DBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The deterministic schedule's second pass: one program owns a query block and sums its dQ
    # over the key blocks in registers, recomputing the scores and dP.
    lengths = (CuSeqlensQ, CuSeqlensK, SeqlensK)
    max_seqlen_q = seqlen_q
    max_seqlen_k = seqlen_k
    start_m, off_b, off_h, q_start, seqlen_q, k_start, seqlen_k, rows, q, mods, dropout = (
        query_block(
            Q,
            stride_q,
            lengths,
            Bias,
            Slopes,
            scoring,
            Seed,
            dropout_p,
            nheads,
            seqlen_q,
            seqlen_k,
            head_dim,
            FEATURES,
            HEAD_DIM,
            VARLEN,
            HAS_SEQLENS_K,
            BLOCK_M,
        )
    )
    if start_m >= seqlen_q:
        return
    off_hk = off_h // (nheads // nheads_k)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    q_mask = (rows[:, None] < seqlen_q) & in_dim[None, :]
    do_offs = head_start(0, stride_o, off_b, off_h, q_start) + rows[:, None] * stride_o[1]
    do_offs += offs_d[None, :]
    do = tl.load(DO + do_offs, mask=q_mask, other=0.0)
    lse_offs = off_b * stride_lse[0] + off_h * stride_lse[1] + q_start + rows
    lse = tl.load(Lse + lse_offs, mask=rows < seqlen_q, other=float("inf")) * LOG2E
    delta = tl.load(Delta + lse_offs, mask=rows < seqlen_q, other=0.0)
    keys = (
        head_start(K, stride_k, off_b, off_hk, k_start),
        head_start(V, stride_v, off_b, off_hk, k_start),
        stride_k[1],
        stride_v[1],
        in_dim,
    )
    dbias = ScoreGrads(DBias, dropout.bh.to(tl.int64) * max_seqlen_q * max_seqlen_k, max_seqlen_k)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, lo_full, hi_full, hi = key_range(
        start_m, seqlen_q, seqlen_k, scoring.window_left, scoring.window_right, BLOCK_M, BLOCK_N
    )
    dq = _attn_bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        rows,
        keys,
        mods,
        dropout,
        dbias,
        lo_full,
        hi_full,
        FEATURES,
        False,
        DBIAS,
        DOT_PRECISION,
        HEAD_DIM,
        BLOCK_N,
    )
    if FEATURES.MASK_WINDOW or not FEATURES.EVEN_N:
        dq = _attn_bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            rows,
            keys,
            mods,
            dropout,
            dbias,
            hi_full,
            hi,
            FEATURES,
            True,
            DBIAS,
            DOT_PRECISION,
            HEAD_DIM,
            BLOCK_N,
        )
    if FEATURES.MASK_LEFT:
        dq = _attn_bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            rows,
            keys,
            mods,
            dropout,
            dbias,
            lo,
            lo_full,
            FEATURES,
            True,
            DBIAS,
            DOT_PRECISION,
            HEAD_DIM,
            BLOCK_N,
        )

    dq = dq * scoring.softmax_scale
    tl.store(DQ + do_offs, dq.to(DQ.dtype.element_ty), mask=q_mask)


class BackwardLaunch:
    """The backward kernels at one launch key: built like
    :class:`~flash_attn.ops.attention.triton.forward.ForwardLaunch` from the inputs' metadata and
    the options (``opts.deterministic`` picks the schedule, see the module docstring), called
    with the tensors.

    Args:
        q, k, v, opts, batch, bias, alibi_slopes, varlen, max_seqlen_q, max_seqlen_k,
            key_ranges: as given to the forward's launch.
        bias_requires_grad: also return the gradient of the scores, summed like the bias.
    """

    def __init__(
        self,
        q,
        k,
        v,
        opts: AttentionOptions,
        *,
        batch: int,
        bias=None,
        alibi_slopes=None,
        varlen=False,
        max_seqlen_q=None,
        max_seqlen_k=None,
        key_ranges=False,
        bias_requires_grad=False,
    ):
        constants = kernel_constants(
            q,
            k,
            opts,
            bias=bias,
            alibi_slopes=alibi_slopes,
            varlen=varlen,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            key_ranges=key_ranges,
        )
        nheads, nheads_k = constants["nheads"], constants["nheads_k"]
        seqlen_q, seqlen_k = constants["seqlen_q"], constants["seqlen_k"]
        self.atomic_dq = not opts.deterministic
        self.lse_shape = lse_shape(q, varlen)
        self.dbias_shape = (batch, nheads, seqlen_q, seqlen_k) if bias_requires_grad else None
        self.placeholder = torch.empty(0, dtype=torch.int32, device=q.device)
        # dO, the output and dQ are contiguous, like q's shape; so is dQ's fp32 accumulator.
        stride_o = token_strides_of(contiguous_strides(q.shape), varlen)
        stride_lse = lse_strides_of(contiguous_strides(self.lse_shape), varlen)
        rows = dict(
            stride_o=stride_o,
            stride_lse=stride_lse,
            nheads=nheads,
            seqlen_q=seqlen_q,
            head_dim=constants["head_dim"],
            HEAD_DIM=constants["HEAD_DIM"],
            VARLEN=varlen,
            BLOCK_M=64,
        )
        row_grid = (batch * nheads, cdiv(seqlen_q, 64))
        self.preprocess = LaunchPlan(
            _attn_bwd_preprocess_kernel,
            row_grid,
            ("Out", "DO", "Delta", "DQAccum", "CuSeqlensQ"),
            ZERO_DQ=self.atomic_dq,
            **rows,
        )
        # What the dK/dV and dQ kernels read beside KERNEL_TENSORS, after what they write.
        reads = ("V", "DO", "Lse", "Delta", "SeqlensK", *KERNEL_TENSORS)
        common = dict(
            stride_v=token_strides(v, varlen), stride_o=stride_o, stride_lse=stride_lse, **constants
        )
        dkdv = dict(
            stride_dk=token_strides_of(contiguous_strides(k.shape), varlen),
            ATOMIC_DQ=self.atomic_dq,
            DBIAS=bias_requires_grad and self.atomic_dq,
            **common,
        )
        kernel, config = kernel_config("dkdv", _attn_bwd_dkdv_kernel, dkdv, q.dtype)
        self.dkdv = LaunchPlan(
            kernel,
            lambda meta: (batch * nheads_k, cdiv(seqlen_k, meta["BLOCK_N"])),
            ("DK", "DV", "DQAccum", "DBias", *reads),
            **dkdv,
            **config,
        )
        if self.atomic_dq:
            self.dq = LaunchPlan(
                _attn_bwd_dq_finish_kernel,
                row_grid,
                ("DQAccum", "DQ", "CuSeqlensQ"),
                softmax_scale=opts.softmax_scale,
                **rows,
            )
        else:
            dq = dict(DBIAS=bias_requires_grad, **common)
            kernel, config = kernel_config("dq", _attn_bwd_dq_kernel, dq, q.dtype)
            self.dq = LaunchPlan(
                kernel,
                lambda meta: (batch * nheads, cdiv(seqlen_q, meta["BLOCK_M"])),
                ("DQ", "DBias", *reads),
                **dq,
                **config,
            )

    def __call__(
        self,
        do,
        q,
        k,
        v,
        out,
        lse,
        *,
        bias=None,
        alibi_slopes=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        key_ranges=None,
        seed=None,
    ):
        """(dq, dk, dv, dbias): contiguous, the inputs' shapes and dtypes; dbias fp32 (batch,
        nheads, max_seqlen_q, max_seqlen_k) (the caller sums broadcast dims) or None. do, out:
        like q; lse: the forward's; the other tensors exactly as given to the forward."""
        do = contiguous_aligned(do)  # its layout is not in the plan's key
        out = out.contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        delta = torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        dq_accum = self.placeholder  # dQ is summed in registers
        if self.atomic_dq:
            dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dbias = None
        if self.dbias_shape is not None:
            dbias = torch.zeros(self.dbias_shape, dtype=torch.float32, device=q.device)
        placeholder = self.placeholder
        tensors = kernel_tensors(
            q,
            k,
            placeholder,
            bias=bias,
            alibi_slopes=alibi_slopes,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seed=seed,
        )
        seqlens_k = key_ranges if key_ranges is not None else placeholder
        reads = (v, do, lse, delta, seqlens_k, *tensors)  # as the plans' "reads"
        dbias_out = dbias if dbias is not None else delta
        cu_seqlens_q = cu_seqlens_q if cu_seqlens_q is not None else placeholder
        with device_guard(q):
            self.preprocess(out, do, delta, dq_accum, cu_seqlens_q)
            self.dkdv(dk, dv, dq_accum, dbias_out, *reads)
            if self.atomic_dq:
                self.dq(dq_accum, dq, cu_seqlens_q)
            else:
                self.dq(dq, dbias_out, *reads)
        return dq, dk, dv, dbias


def attention_bwd(
    do,
    q,
    k,
    v,
    out,
    lse,
    opts: AttentionOptions,
    *,
    bias=None,
    alibi_slopes=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seed=None,
    bias_requires_grad=False,
):
    """Launch the backward kernels once (:class:`BackwardLaunch` built and called): (dq, dk,
    dv, dbias). Arguments as given to ``attention_fwd``."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    launch = BackwardLaunch(
        q,
        k,
        v,
        opts,
        batch=batch,
        bias=bias,
        alibi_slopes=alibi_slopes,
        varlen=varlen,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        bias_requires_grad=bias_requires_grad,
    )
    return launch(
        do,
        q,
        k,
        v,
        out,
        lse,
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seed=seed,
    )
