"""FlashAttention-2 forward in Triton, the score modifiers shared with the backward, launchers.

Layout: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim), or,
for variable-length batches, (total_tokens, nheads, headdim) with cu_seqlens (batch + 1,) int32.
Any strides with a unit last stride. Query head h reads key/value head h // (nheads // nheads_k).
No sequence length has to be a multiple of a block: loads and stores are masked.

Scores, in order: s = q k^T * softmax_scale; softcap * tanh(s / softcap) when softcap > 0;
+ bias[b, h, i, j]; - slope[b, h] * |i + seqlen_k - seqlen_q - j| (ALiBi); then masked to
-inf outside the window seqlen_k - seqlen_q + i - left <= j <= seqlen_k - seqlen_q + i + right
(causal is right = 0: the diagonal is aligned to the bottom-right corner). Blocks entirely
outside the window are skipped, so work grows with the window, not with the sequence.

Numerics: the softmax uses exp2 on scores scaled by log2(e); the running max, running sum and
output accumulator stay in fp32; the log-sum-exp is stored in natural-log units, +inf for a row
that attends to nothing (its output is zero, never NaN). In the forward, keys that a row may
not see contribute nothing to it even when they hold NaN or inf (see :func:`_attn_fwd_inner`);
keys outside the sequence are never read.

Dropout draws from Philox keyed by a seed tensor and the element's position
((batch * nheads + head) * max_seqlen_q + i) * max_seqlen_k + j, so the backward regenerates
the mask instead of storing it.

Kernel arguments that belong together travel as tuples: each tensor's (batch, token, head)
strides (``stride_q``, ..., see :func:`head_start`), the sequence offsets (``lengths``, see
:func:`sequence`), the score modifiers' scalars (``scoring``, a :class:`Scoring`) and the
compile-time features of a launch (``FEATURES``, a :class:`Features`), the last two built by
:func:`kernel_constants` on the host, so that the kernels' signatures do not change with the
score modifiers. Every kernel that owns a query block starts with :func:`query_block`; what
the score modifiers of one head need travels as one tuple (``mods``, see :func:`score_mods`),
and so does what the dropout mask needs (``dropout``, see :func:`dropout_keep`).

Adding a score modifier: its flag in :class:`Features`, its scalars in :class:`Scoring`, both
set in :func:`kernel_constants` from :class:`~flash_attn.ops.attention.options.AttentionOptions`,
and its term in :func:`scores` (with its derivative where it is not additive, as the softcap's).

Two forward kernels share every piece above: ``_attn_fwd_kernel`` for training (dense and
varlen batches), and ``_attn_decode_kernel`` for reading a KV cache or paged keys (each batch
entry's key range, its cache row, its page table, split-KV), so that the training kernel
carries only the compile-time features training needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.triton.tuning import MAX_BLOCK, kernel_config, target_arch
from flash_attn.ops.launch import LaunchPlan, cdiv, device_guard, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)


class Features(NamedTuple):
    """The compile-time features of a launch: one constexpr kernel argument, ``FEATURES``,
    built by :func:`kernel_constants` (``FEATURES.SOFTCAP``, ...)."""

    SCORE_MODS: tl.constexpr  # any of the three below: the scores need more than a scale
    SOFTCAP: tl.constexpr  # softcap * tanh(s / softcap)
    HAS_BIAS: tl.constexpr  # + bias
    HAS_ALIBI: tl.constexpr  # - slope * |i - j| (bottom-right aligned)
    MASK_WINDOW: tl.constexpr  # a window or causal mask
    MASK_LEFT: tl.constexpr  # the window has a left edge (window_size[0] >= 0); causal has not
    DROPOUT: tl.constexpr
    EVEN_M: tl.constexpr  # seqlen_q is a multiple of every BLOCK_M: no bounds masks on rows
    EVEN_N: tl.constexpr  # seqlen_k is a multiple of every BLOCK_N: no bounds masks on keys


class Scoring(NamedTuple):
    """The score modifiers' scalars: one kernel argument, ``scoring``, built by
    :func:`kernel_constants`. The tensors they read are kernel arguments of their own, ``Bias``
    (broadcastable to (B, H, Sq, Sk), read when HAS_BIAS) and ``Slopes`` ((H,) or (B, H) fp32,
    read when HAS_ALIBI), which a launch plan replaces at every call."""

    stride_bias: tuple  # (b, h, m, n)
    stride_slope_b: int  # 0 for (H,) slopes
    softmax_scale: float
    softcap: float
    window_left: int  # keys visible before the diagonal (seqlen_q + seqlen_k: unlimited)
    window_right: int  # keys visible after it


class ScoreMods(NamedTuple):
    """What :func:`scores` needs for one head of one batch entry (built by :func:`score_mods`):
    the launch's :class:`Scoring` and what is particular to the head."""

    scoring: tuple  # a Scoring
    seqlen_q: tl.tensor
    seqlen_k: tl.tensor
    bias_base: tl.tensor  # the head's bias, (Sq, Sk) with strides (stride_bias_m, _n)
    stride_bias_m: tl.tensor
    stride_bias_n: tl.tensor
    slope: tl.tensor  # ALiBi slope of the head


class Dropout(NamedTuple):
    """What :func:`dropout_keep` needs for one head of one batch entry."""

    seed: tl.tensor
    bh: tl.tensor  # batch entry * nheads + head
    max_seqlen_q: tl.tensor
    max_seqlen_k: tl.tensor
    dropout_p: tl.tensor


# ---------------------------------------------------------------------------------------------
# Pieces shared by every attention kernel


@triton.jit
def sequence(lengths, off_b, seqlen_q, seqlen_k, VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of batch entry off_b: its first row in the token
    dimension and its lengths. lengths: (CuSeqlensQ, CuSeqlensK, SeqlensK), the (B + 1,) int32
    offsets of packed varlen batches, read when VARLEN, and SeqlensK, (B, 2) int32 when
    HAS_SEQLENS_K, which overrides the keys: batch entry b sees keys
    [SeqlensK[b, 0], SeqlensK[b, 1]) of its cache row (a KV cache with cache_leftpad and
    cache_seqlens, or the pages of a paged varlen batch), which the kernel then indexes from 0."""
    CuSeqlensQ, CuSeqlensK, SeqlensK = lengths
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CuSeqlensQ + off_b)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqlensK + off_b)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start
    if HAS_SEQLENS_K:
        k_start = tl.load(SeqlensK + 2 * off_b)
        seqlen_k = tl.load(SeqlensK + 2 * off_b + 1) - k_start
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def tanh(x):
    """tanh within a few fp32 ulps of relative error everywhere, 0 included (2 sigmoid(2x) - 1
    loses all relative precision near 0), in plain arithmetic, so that the compiled kernels and
    the CPU interpreter share it: Eigen's rational approximation on [-9, 9], where it reaches
    +-1 in fp32."""
    x = tl.clamp(x, -9.0, 9.0, propagate_nan=tl.PropagateNan.ALL)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 - 8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return x * p / q


@triton.jit
def score_mods(Bias, Slopes, scoring, off_b, off_h, seqlen_q, seqlen_k, HAS_ALIBI: tl.constexpr):
    """The :class:`ScoreMods` of head off_h of batch entry off_b; Bias, Slopes and scoring (a
    :class:`Scoring`): the kernel's arguments of these names."""
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n = scoring.stride_bias
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * scoring.stride_slope_b + off_h)
    return ScoreMods(scoring, seqlen_q, seqlen_k, bias_base, stride_bias_m, stride_bias_n, slope)


@triton.jit
def scores(
    qk,
    rows,
    cols,
    mods,
    FEATURES: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Attention scores of a tile from its q k^T, in log2 units (score * log2(e), for exp2),
    with d(score)/d(q k^T * softmax_scale) from the softcap (1 without). rows and cols index
    the tile's queries and keys, broadcast against each other: (M, 1) and (1, N) for a q k^T
    tile, (1, M) and (N, 1) for a k q^T tile. MASKED: -inf where not visible (outside the
    window or the sequences, bounds skipped along an EVEN dimension); without it every score
    of the tile must be visible. mods: a :class:`ScoreMods`."""
    seqlen_q, seqlen_k, scoring = mods.seqlen_q, mods.seqlen_k, mods.scoring
    window_left, window_right = scoring.window_left, scoring.window_right
    dsoftcap = 1.0
    if FEATURES.SOFTCAP:
        t = tanh(qk * (scoring.softmax_scale / scoring.softcap))
        s = t * (scoring.softcap * LOG2E)
        dsoftcap = 1.0 - t * t
    else:
        s = qk * (scoring.softmax_scale * LOG2E)
    if FEATURES.HAS_BIAS:
        in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
        bias_ptrs = mods.bias_base + rows * mods.stride_bias_m + cols * mods.stride_bias_n
        bias = tl.load(bias_ptrs, mask=in_bounds, other=0.0)
        s += bias.to(tl.float32) * LOG2E
    diag = seqlen_k - seqlen_q
    if FEATURES.HAS_ALIBI:
        s -= (mods.slope * LOG2E) * tl.abs(cols - rows - diag).to(tl.float32)
    if MASKED:
        # A query sees an interval of keys: each key is compared with its query's two ends,
        # computed once per query.
        visible = tl.full(s.shape, True, tl.int1)
        if FEATURES.MASK_LEFT:
            visible = cols >= rows + (diag - window_left)
        if FEATURES.MASK_WINDOW or not (FEATURES.EVEN_M and FEATURES.EVEN_N):
            last_key = (
                rows + (diag + window_right) if FEATURES.MASK_WINDOW else rows * 0 + (seqlen_k - 1)
            )
            if FEATURES.MASK_WINDOW and not FEATURES.EVEN_N:
                last_key = tl.minimum(last_key, seqlen_k - 1)
            if not FEATURES.EVEN_M:
                last_key = tl.where(rows < seqlen_q, last_key, -1)
            visible = visible & (cols <= last_key)
        s = tl.where(visible, s, float("-inf"))
    return s, dsoftcap


@triton.jit
def block_indices(start, length, BLOCK: tl.constexpr, MASKED: tl.constexpr, EVEN: tl.constexpr):
    """(indices, inside), both (BLOCK,): the indices start, ..., start + BLOCK - 1 of a block
    along one dimension and which of them are < length. Without MASKED (a block seen whole) or
    along an EVEN dimension every index counts as inside, so the bounds checks compile away."""
    indices = start + tl.arange(0, BLOCK)
    return indices, (indices < length) | (not MASKED) | EVEN


@triton.jit
def key_range(
    start_m,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(lo, lo_full, hi_full, hi): keys [lo, hi) are those some query of the block starting at
    start_m can see (lo a multiple of BLOCK_N); the key blocks in [lo_full, hi_full) are seen
    whole by every query of the block (inside the window and the keys), so their tiles need no
    mask. With the roles swapped (key block start, seqlen_k, seqlen_q, right, left, BLOCK_N,
    BLOCK_M) it gives the query blocks of a key block."""
    diag = seqlen_k - seqlen_q
    lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + diag + window_right, seqlen_k)
    # The block's last query (past seqlen_q there are none) sees keys from first_key on, its
    # first query keys before end.
    first_key = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + diag - window_left
    lo_full = tl.minimum(lo + tl.cdiv(tl.maximum(first_key - lo, 0), BLOCK_N) * BLOCK_N, hi)
    end = tl.minimum(start_m + diag + window_right + 1, hi)
    hi_full = lo_full + tl.maximum(end - lo_full, 0) // BLOCK_N * BLOCK_N
    return lo, lo_full, hi_full, hi


@triton.jit
def key_offsets(cols, in_keys, pages, stride_b, stride_n, PAGED: tl.constexpr):
    """Offsets of keys ``cols`` from their cache row: cols * stride_n, or, in a paged cache,
    through the batch entry's page table (page p of the sequence is cache row BlockTable[b, p]).
    pages: (BlockTable, off_b, stride_table_b, page_size)."""
    offsets = cols * stride_n
    if PAGED:
        BlockTable, off_b, stride_table_b, page_size = pages
        page = tl.load(
            BlockTable + off_b * stride_table_b + cols // page_size, mask=in_keys, other=0
        )
        offsets = page.to(tl.int64) * stride_b + (cols % page_size) * stride_n
    return offsets


@triton.jit
def load_keys(src, cols, in_keys, in_dim, pages, PAGED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The tile of K or V holding keys cols, (BLOCK_N, HEAD_DIM), or (HEAD_DIM, BLOCK_N) when
    TRANSPOSED; 0 outside the keys (not in_keys) and past the head dim (not in_dim). src:
    (base, stride_b, stride_n), located through :func:`key_offsets` (with pages)."""
    base, stride_b, stride_n = src
    offsets = key_offsets(cols, in_keys, pages, stride_b, stride_n, PAGED)
    offs_d = tl.arange(0, in_dim.shape[0])
    if TRANSPOSED:
        tile = tl.load(
            base + offsets[None, :] + offs_d[:, None],
            mask=in_keys[None, :] & in_dim[:, None],
            other=0.0,
        )
    else:
        tile = tl.load(
            base + offsets[:, None] + offs_d[None, :],
            mask=in_keys[:, None] & in_dim[None, :],
            other=0.0,
        )
    return tile


@triton.jit
def nonfinite_rows(x):
    """(rows,) bool: which rows of x (rows, cols) hold NaN or inf."""
    return tl.sum((x * 0.0).to(tl.float32), 1) != 0.0  # 0 * (NaN or inf) is NaN


@triton.jit
def dropout_keep(dropout, rows, start_n, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Bool tile, True where the weight of query rows[i] and key start_n + j is kept:
    (len(rows), BLOCK_N), or (BLOCK_N, len(rows)) when TRANSPOSED; rows broadcast as the tile's
    query index ((M, 1), or (1, M) when TRANSPOSED). dropout: a :class:`Dropout`.

    One Philox call draws the four keys 4c..4c+3 of a query, so the mask of a weight depends
    on its position alone, never on the tile that computes it."""
    tl.static_assert(BLOCK_N % 4 == 0)
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    row_offsets = (dropout.bh.to(tl.int64) * dropout.max_seqlen_q + rows) * tl.cdiv(
        dropout.max_seqlen_k, 4
    )
    offsets = groups[:, None] + row_offsets if TRANSPOSED else row_offsets + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(dropout.seed, offsets)
    threshold = tl.cast(dropout.dropout_p * 4294967296.0, tl.uint32)
    # join(join(a, c), join(b, d)) flattens its last two dims to a, b, c, d.
    keep = tl.join(
        tl.join(r0 >= threshold, r2 >= threshold), tl.join(r1 >= threshold, r3 >= threshold)
    )
    if TRANSPOSED:
        keep = tl.reshape(tl.permute(keep, (0, 2, 3, 1)), (BLOCK_N, offsets.shape[1]))
    else:
        keep = tl.reshape(keep, (offsets.shape[0], BLOCK_N))
    return keep


@triton.jit
def program_block(BLOCK: tl.constexpr, nheads, heavy_last):
    """(start, bh, off_b, off_h) of the block this program owns in a grid of (batch * nheads,
    blocks along the sequence): its first row, bh = off_b * nheads + off_h, the batch entry and
    the head. The GPU starts programs in grid order, every head's first block before any second
    one; heavy_last (a mask that gives the last blocks the most work, e.g. causal queries)
    reverses the blocks, so that the heaviest start first and the light ones fill the tail."""
    bh = tl.program_id(0)
    block = tl.program_id(1)
    if heavy_last:
        block = tl.num_programs(1) - 1 - block
    return block * BLOCK, bh, bh // nheads, bh % nheads


@triton.jit
def heavy_last(window_before, window_after):
    """Whether the last blocks of rows do the most work (see :func:`program_block`): each row
    sees window_before + 1 + window_after other rows, fewer where the window is cut off by the
    start (its before-part) or the end (its after-part) of the sequence, so the larger part
    decides which end is light. Causal queries: before unlimited, after 0."""
    return window_before > window_after


@triton.jit
def head_start(T, strides, off_b, off_h, start):
    """Pointer to token ``start`` of head off_h of batch entry off_b in T, (B, S, H, D), or
    varlen (total_tokens, H, D) with batch stride 0; strides: its (batch, token, head) strides."""
    return T + off_b * strides[0] + off_h * strides[2] + start * strides[1]


@triton.jit
def query_block(
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
    FEATURES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQLENS_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """What a program that owns a query block (see :func:`program_block`) starts from:
    (start_m, off_b, off_h, q_start, seqlen_q, k_start, seqlen_k, rows, q, mods, dropout), with
    the block's q (BLOCK_M, HEAD_DIM) loaded, mods for :func:`scores` and dropout for
    :func:`dropout_keep`. The arguments are the kernels' of these names (stride_q: (batch,
    token, head) strides)."""
    order = heavy_last(scoring.window_left, scoring.window_right)
    start_m, bh, off_b, off_h = program_block(BLOCK_M, nheads, order)
    max_seqlen_q = seqlen_q
    max_seqlen_k = seqlen_k
    q_start, seqlen_q, k_start, seqlen_k = sequence(
        lengths, off_b, seqlen_q, seqlen_k, VARLEN, HAS_SEQLENS_K
    )
    rows = start_m + tl.arange(0, BLOCK_M)
    q_base = head_start(Q, stride_q, off_b, off_h, q_start)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_base + rows[:, None] * stride_q[1] + offs_d[None, :]
    q_mask = (rows[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    mods = score_mods(Bias, Slopes, scoring, off_b, off_h, seqlen_q, seqlen_k, FEATURES.HAS_ALIBI)
    seed = 0
    if FEATURES.DROPOUT:
        seed = tl.load(Seed)
    dropout = Dropout(seed, bh, max_seqlen_q, max_seqlen_k, dropout_p)
    return start_m, off_b, off_h, q_start, seqlen_q, k_start, seqlen_k, rows, q, mods, dropout


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    keys,
    rows,
    mods,
    dropout,
    lo,
    hi,
    FEATURES: tl.constexpr,
    MASKED: tl.constexpr,
    GUARD: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The online softmax over key blocks [lo, hi) (lo a multiple of BLOCK_N): (acc, l_i, m_i)
    updated, m_i in log2 units. keys: (k_src, v_src, in_dim, pages), k_src and v_src as
    :func:`load_keys` takes them. Without MASKED every score of every block is visible.

    GUARD: 0 on the main path; on the rarely run guarded path (see ``_forward_program``), the
    loop's pipeline stages (1: not pipelined, no shared memory of its
    own). With MASKED, NaN and inf in a key's v then reach only the rows that see it: otherwise
    p = 0 for the rows that may not see the key, but 0 * NaN is NaN. Such a key's v is taken as
    zeros and its visible scores become NaN, so the rows that see it come out NaN, as 0 * NaN
    makes them; every other row is bit for bit what it is without."""
    k_src, v_src, in_dim, pages = keys
    seqlen_k = mods.seqlen_k
    qk_scale = mods.scoring.softmax_scale * LOG2E
    STAGES: tl.constexpr = GUARD if GUARD else None  # None: the config's num_stages
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols, in_keys = block_indices(start_n, seqlen_k, BLOCK_N, MASKED, FEATURES.EVEN_N)
        kT = load_keys(k_src, cols, in_keys, in_dim, pages, PAGED, True)
        v = load_keys(v_src, cols, in_keys, in_dim, pages, PAGED, False)
        if GUARD and MASKED:
            bad = nonfinite_rows(v)
            v = tl.where(bad[:, None], 0.0, v).to(v.dtype)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        if MASKED or FEATURES.SCORE_MODS:
            s, _ = scores(qk, rows[:, None], cols[None, :], mods, FEATURES, MASKED)
            if GUARD and MASKED:
                s = tl.where(bad[None, :] & (s > float("-inf")), float("nan"), s)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far keeps m = -inf; shift by 0 to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            # Plain scores are qk * qk_scale, qk_scale > 0: one multiply-add each.
            m_shift = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_new = m_shift
            p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FEATURES.DROPOUT:
            p = tl.where(dropout_keep(dropout, rows[:, None], start_n, BLOCK_N, False), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _store_probs(
    P,
    q,
    keys,
    rows,
    mods,
    dropout,
    lse2,
    FEATURES: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Store the block's probabilities exp2(s - lse2) (lse2: (BLOCK_M,) log-sum-exp in log2
    units) over every key of its sequence into P, (B, H, max_seqlen_q, max_seqlen_k), laid out
    as the dropout positions are; negated where dropout drops the weight."""
    k_src, _v_src, in_dim, pages = keys
    seqlen_q, seqlen_k = mods.seqlen_q, mods.seqlen_k
    bh, max_seqlen_q, max_seqlen_k = dropout.bh, dropout.max_seqlen_q, dropout.max_seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols, in_keys = block_indices(start_n, seqlen_k, BLOCK_N, True, False)
        kT = load_keys(k_src, cols, in_keys, in_dim, pages, PAGED, True)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, _ = scores(qk, rows[:, None], cols[None, :], mods, FEATURES, True)
        p = tl.math.exp2(s - lse2[:, None])
        if FEATURES.DROPOUT:
            p = tl.where(dropout_keep(dropout, rows[:, None], start_n, BLOCK_N, False), p, -p)
        offsets = (bh.to(tl.int64) * max_seqlen_q + rows[:, None]) * max_seqlen_k + cols[None, :]
        tl.store(
            P + offsets,
            p.to(P.dtype.element_ty),
            mask=(rows[:, None] < seqlen_q) & in_keys[None, :],
        )


@triton.jit
def _attn_fwd_rows(
    q,
    keys,
    rows,
    mods,
    dropout,
    key_blocks,
    outputs,
    place,
    FEATURES: tl.constexpr,
    GUARD: tl.constexpr,
    PAGED: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Attend the query block (q, rows) to every key it sees and store its output, lse and,
    with STORE_PROBS, probabilities. Returns whether the block's unnormalised output holds NaN
    or inf (always False without a window mask). outputs: (Out, stride_o, stride_out_split,
    Lse, stride_lse, stride_lse_split, P); place: (off_b, off_h, q_start, start_m, split,
    head_dim), start_m the block's first row.
    GUARD: see :func:`_attn_fwd_inner`. Other arguments: the forward kernel's."""
    Out, stride_o, stride_out_split, Lse, stride_lse, stride_lse_split, P = outputs
    off_b, off_h, q_start, start_m, split, head_dim = place
    lo, lo_full, hi_full, hi = key_blocks
    seqlen_q, dropout_p = mods.seqlen_q, dropout.dropout_p
    BLOCK_M: tl.constexpr = rows.shape[0]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Blocks seen whole need no mask; only those at the window's edges, on the diagonal or past
    # the last full block of keys do (without a window and with EVEN_N, there are none). Only
    # they hold keys that some rows may not see and that are loaded (keys outside the sequence
    # are loaded as 0).
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        keys,
        rows,
        mods,
        dropout,
        lo_full,
        hi_full,
        FEATURES,
        False,
        GUARD,
        PAGED,
        DOT_PRECISION,
        BLOCK_N,
    )
    if FEATURES.MASK_WINDOW or not FEATURES.EVEN_N:
        acc, l_i, m_i = _attn_fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            keys,
            rows,
            mods,
            dropout,
            hi_full,
            hi,
            FEATURES,
            True,
            GUARD,
            PAGED,
            DOT_PRECISION,
            BLOCK_N,
        )
    if FEATURES.MASK_LEFT:
        acc, l_i, m_i = _attn_fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            keys,
            rows,
            mods,
            dropout,
            lo,
            lo_full,
            FEATURES,
            True,
            GUARD,
            PAGED,
            DOT_PRECISION,
            BLOCK_N,
        )
    spoiled = False
    if FEATURES.MASK_WINDOW:
        total = tl.sum(tl.sum(acc, 1), 0)
        spoiled = total - total != 0.0

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if FEATURES.DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    if STORE_PROBS:
        _store_probs(
            P,
            q,
            keys,
            rows,
            mods,
            dropout,
            lse2,
            FEATURES,
            PAGED,
            DOT_PRECISION,
            BLOCK_N,
        )
    lse = lse2 / LOG2E
    lse_ptrs = Lse + split * stride_lse_split + off_b * stride_lse[0] + off_h * stride_lse[1]
    tl.store(lse_ptrs + q_start + rows, lse, mask=rows < seqlen_q)
    o = acc.to(Out.dtype.element_ty)
    o_base = head_start(Out + split * stride_out_split, stride_o, off_b, off_h, q_start)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = o_base + rows[:, None] * stride_o[1] + offs_d[None, :]
    tl.store(o_ptrs, o, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < head_dim))
    return spoiled


@triton.jit
def _forward_program(
    Q,
    K,
    V,
    Out,
    Lse,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_lse,
    lengths,
    Bias,
    Slopes,
    scoring,
    Seed,
    dropout_p,
    KBatchIdx,
    P,
    keys_per_split,
    stride_out_split,
    stride_lse_split,
    BlockTable,
    stride_table_b,
    page_size,
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    FEATURES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_SEQLENS_K: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr,
    PAGED: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    RERUN_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward of the query block this program owns: the body of both forward kernels,
    whose arguments of these names it takes (lengths: see :func:`sequence`)."""
    # q stays in SRAM for the whole loop over keys.
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
    off_bk = off_b
    if HAS_KV_BATCH_IDX:
        off_bk = tl.load(KBatchIdx + off_b)
    if PAGED:
        off_bk = 0  # each key's page gives its row below
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    k_base = head_start(K, stride_k, off_bk, off_hk, k_start)
    v_base = head_start(V, stride_v, off_bk, off_hk, k_start)

    lo, lo_full, hi_full, hi = key_range(
        start_m, seqlen_q, seqlen_k, scoring.window_left, scoring.window_right, BLOCK_M, BLOCK_N
    )
    split = 0
    if SPLIT_KV:
        # program_id(2) takes keys [split * keys_per_split, (split + 1) * keys_per_split), a
        # multiple of BLOCK_N, and writes a partial result that the launcher combines.
        split = tl.program_id(2)
        lo = tl.maximum(lo, split * keys_per_split)
        hi = tl.minimum(hi, (split + 1) * keys_per_split)
        lo_full = tl.minimum(tl.maximum(lo_full, lo), hi)
        hi_full = tl.minimum(tl.maximum(hi_full, lo_full), hi)
    pages = (BlockTable, off_b, stride_table_b, page_size)
    # A paged cache steps over pages with the batch stride.
    keys = ((k_base, stride_k[0], stride_k[1]), (v_base, stride_v[0], stride_v[1]), in_dim, pages)
    key_blocks = (lo, lo_full, hi_full, hi)
    outputs = (Out, stride_o, stride_out_split, Lse, stride_lse, stride_lse_split, P)
    place = (off_b, off_h, q_start, start_m, split, head_dim)
    spoiled = _attn_fwd_rows(
        q,
        keys,
        rows,
        mods,
        dropout,
        key_blocks,
        outputs,
        place,
        FEATURES,
        0,
        PAGED,
        STORE_PROBS,
        DOT_PRECISION,
        HEAD_DIM,
        BLOCK_N,
    )
    # A masked key holding NaN or inf in v spoils the rows that may not see it (0 * NaN), and
    # with them the sum of the block. Only then is the block computed and stored again with the
    # guard (see _attn_fwd_inner), which leaves the other rows bit for bit as they were: the
    # common case pays one sum, and the guard's work stays out of the main loops.
    if spoiled:  # a constant False without a window mask
        _attn_fwd_rows(
            q,
            keys,
            rows,
            mods,
            dropout,
            key_blocks,
            outputs,
            place,
            FEATURES,
            RERUN_STAGES,
            PAGED,
            STORE_PROBS,
            DOT_PRECISION,
            HEAD_DIM,
            BLOCK_N,
        )


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,  # (B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D); varlen: no B
    Out,  # like Q, contiguous
    Lse,  # (B, H, Sq) or varlen (H, total_q), fp32
    stride_q,
    stride_k,
    stride_v,
    stride_o,  # (batch, token, head) strides; varlen: batch 0
    stride_lse,  # (batch, head)
    CuSeqlensQ,
    CuSeqlensK,  # see sequence()
    Bias,
    Slopes,
    scoring,  # see Scoring
    Seed,
    dropout_p,  # (1,) int64, read when DROPOUT
    P,  # (B, H, max_Sq, max_Sk) like Q: the probabilities, written when STORE_PROBS
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    seqlen_q_bucket,
    seqlen_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    FEATURES: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    # Pipeline stages of the guarded rerun (see _attn_fwd_inner): 1 (none) on sm_90, whose
    # wgmma reads its operands from shared memory; 2 on older GPUs, where an unpipelined loop
    # stages its tiles in registers (it spills at head dim 256).
    RERUN_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The training forward: dense or varlen batches."""
    _forward_program(
        Q,
        K,
        V,
        Out,
        Lse,
        stride_q,
        stride_k,
        stride_v,
        stride_o,
        stride_lse,
        (CuSeqlensQ, CuSeqlensK, CuSeqlensK),
        Bias,
        Slopes,
        scoring,
        Seed,
        dropout_p,
        Seed,
        P,
        0,
        0,
        0,
        Seed,
        0,
        1,
        nheads,
        nheads_k,
        seqlen_q,
        seqlen_k,
        head_dim,
        FEATURES,
        HEAD_DIM,
        VARLEN,
        False,
        False,
        False,
        False,
        STORE_PROBS,
        RERUN_STAGES,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
    )


@triton.jit
def _attn_decode_kernel(
    Q,
    K,
    V,
    Out,
    Lse,  # as in _attn_fwd_kernel; k and v: caches (B_cache, S_cache, Hk, D)
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_lse,
    CuSeqlensQ,
    CuSeqlensK,
    SeqlensK,  # see sequence()
    Bias,
    Slopes,
    scoring,  # see Scoring
    Seed,
    dropout_p,
    KBatchIdx,  # (B,) int32 cache row of each batch entry, read when HAS_KV_BATCH_IDX
    P,
    keys_per_split,
    stride_out_split,
    stride_lse_split,  # split-KV: one slice of keys each
    BlockTable,
    stride_table_b,
    page_size,  # paged cache: (B, pages) int32, read when PAGED
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    seqlen_q_bucket,
    seqlen_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr,
    FEATURES: tl.constexpr,
    PAGED: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    RERUN_STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The forward over a KV cache or paged keys: each batch entry sees the keys
    [SeqlensK[b, 0], SeqlensK[b, 1]) of its cache row (KBatchIdx[b]) or of its pages."""
    _forward_program(
        Q,
        K,
        V,
        Out,
        Lse,
        stride_q,
        stride_k,
        stride_v,
        stride_o,
        stride_lse,
        (CuSeqlensQ, CuSeqlensK, SeqlensK),
        Bias,
        Slopes,
        scoring,
        Seed,
        dropout_p,
        KBatchIdx,
        P,
        keys_per_split,
        stride_out_split,
        stride_lse_split,
        BlockTable,
        stride_table_b,
        page_size,
        nheads,
        nheads_k,
        seqlen_q,
        seqlen_k,
        head_dim,
        FEATURES,
        HEAD_DIM,
        VARLEN,
        True,
        HAS_KV_BATCH_IDX,
        PAGED,
        SPLIT_KV,
        STORE_PROBS,
        RERUN_STAGES,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
    )


# ---------------------------------------------------------------------------------------------
# Launchers


def token_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of t, the kernels' stride_q, stride_k, ...: batch stride 0
    for packed varlen tensors (total_tokens, heads, head_dim)."""
    return (0, t.stride(0), t.stride(1)) if varlen else tuple(t.stride()[:3])


def kernel_constants(
    q,
    k,
    opts: AttentionOptions,
    *,
    bias=None,
    alibi_slopes=None,
    varlen: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    key_ranges: bool = False,
    paged: bool = False,
) -> dict:
    """The arguments that every attention kernel takes and that stay the same at one launch
    key (sizes, strides, options, constexprs: all but the tensors).

    Inputs are assumed validated by ``flash_attn.ops.attention``. Shapes as in the module
    docstring; ``bias`` (only its strides are read) already expanded (stride 0 on broadcast
    dims) to (B, H, Sq, Sk). varlen: q, k, v are packed (total_tokens, H, D) with max_seqlen_q,
    max_seqlen_k. key_ranges: each batch entry's keys are a range of its cache row (see
    :func:`sequence`); paged: k is a paged cache (num_pages, page_size, nheads_k, headdim), whose
    capacity is max_seqlen_k.
    """
    nheads, head_dim = q.shape[-2], q.shape[-1]
    if varlen:
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        seqlen_q = q.shape[1]
        seqlen_k = max_seqlen_k or k.shape[1]  # a paged cache passes its capacity
    unlimited = seqlen_q + seqlen_k  # farther than any query-key distance
    left = unlimited if opts.window_left < 0 else opts.window_left
    right = 0 if opts.causal else (unlimited if opts.window_right < 0 else opts.window_right)
    slope_stride = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        slope_stride = alibi_slopes.stride(0)
    has_bias, has_alibi, softcap = bias is not None, alibi_slopes is not None, opts.softcap > 0.0
    return dict(
        stride_q=token_strides(q, varlen),
        stride_k=token_strides(k, varlen and not paged),
        scoring=Scoring(
            stride_bias=tuple(bias.stride()) if has_bias else (0, 0, 0, 0),
            stride_slope_b=slope_stride,
            softmax_scale=opts.softmax_scale,
            softcap=opts.softcap,
            window_left=left,
            window_right=right,
        ),
        dropout_p=opts.dropout_p,
        nheads=nheads,
        nheads_k=k.shape[-2],
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        seqlen_q_bucket=next_power_of_2(seqlen_q),
        seqlen_k_bucket=next_power_of_2(seqlen_k),
        HEAD_DIM=max(16, next_power_of_2(head_dim)),
        VARLEN=varlen,
        HAS_SEQLENS_K=key_ranges,
        FEATURES=Features(
            SCORE_MODS=softcap or has_bias or has_alibi,
            SOFTCAP=softcap,
            HAS_BIAS=has_bias,
            HAS_ALIBI=has_alibi,
            MASK_WINDOW=left < unlimited or right < unlimited,
            MASK_LEFT=left < unlimited,
            DROPOUT=opts.dropout_p > 0.0,
            # Lengths that are multiples of every block size need no bounds masks.
            EVEN_M=not varlen and seqlen_q % MAX_BLOCK == 0,
            EVEN_N=not varlen and not key_ranges and seqlen_k % MAX_BLOCK == 0,
        ),
        # fp32 inputs get full-precision products, to match torch.matmul's default (no TF32).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# The tensor arguments every attention kernel takes, in the order of kernel_tensors.
KERNEL_TENSORS = ("Q", "K", "CuSeqlensQ", "CuSeqlensK", "Bias", "Slopes", "Seed")


def kernel_tensors(
    q,
    k,
    placeholder,
    *,
    bias=None,
    alibi_slopes=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seed=None,
) -> tuple:
    """The tensors of :data:`KERNEL_TENSORS`, in its order; ``placeholder`` (an empty int32
    tensor on q's device) stands for those a launch does not read."""
    return (
        q,
        k,
        cu_seqlens_q if cu_seqlens_q is not None else placeholder,
        cu_seqlens_k if cu_seqlens_k is not None else placeholder,
        bias if bias is not None else placeholder,
        alibi_slopes if alibi_slopes is not None else placeholder,
        seed if seed is not None else placeholder,
    )


def key_ranges_of(seqlens_k, cache_leftpad=None, cu_seqlens_k=None):
    """(B, 2) int32 [first, end) keys of each batch entry's cache row (see :func:`sequence`):
    from seqlens_k (B,) and cache_leftpad (B,) (a KV cache), or from cu_seqlens_k (B + 1,) (the
    pages of a paged varlen batch, which start at position 0); None without either."""
    if cu_seqlens_k is not None:
        seqlens_k = cu_seqlens_k.diff()
    if seqlens_k is None:
        return None
    first = cache_leftpad if cache_leftpad is not None else torch.zeros_like(seqlens_k)
    return torch.stack([first, seqlens_k], dim=1).to(torch.int32)


def lse_shape(q, varlen: bool) -> tuple[int, ...]:
    """Lse as the official API lays it out: (B, H, Sq), or (H, total_q) for varlen."""
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


class ForwardLaunch:
    """A forward kernel at one launch key: built from the inputs' shapes, strides and the
    options, called with the tensors (see :class:`~flash_attn.ops.launch.LaunchPlan`).
    ``_attn_decode_kernel`` where keys come from a KV cache or pages (key_ranges, kv_batch_idx,
    block_table, num_splits > 1), else ``_attn_fwd_kernel``.

    Args:
        q, k, v, opts, bias, alibi_slopes, varlen, max_seqlen_q, max_seqlen_k: see
            :func:`kernel_constants`; batch: the batch size (for varlen, len(cu_seqlens_q) - 1).
        key_ranges: each batch entry's keys are a range of its cache row (KV cache, paged varlen).
        num_splits: split the keys across this many programs per query block (split-KV, for
            decoding with few queries and a long cache); partial results are combined here.
        kv_batch_idx: the calls pass k_batch_idx, each batch entry's cache row (KV cache).
        block_table: given for a paged cache (only its strides are read here; the calls pass
            it): (batch, max_pages) int32, k and v are then (num_pages, page_size, nheads_k,
            headdim) and key j of batch entry b lives at [block_table[b, j // page_size],
            j % page_size].
        store_probs: the calls pass probs, a zeroed (batch, nheads, max_seqlen_q, max_seqlen_k)
            tensor of q's dtype (the official ``S_dmask``, for tests) that receives the
            probabilities before dropout, negated where dropout drops the weight; one split only.
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
        num_splits=1,
        kv_batch_idx=False,
        block_table=None,
        store_probs=False,
    ):
        paged = block_table is not None
        if store_probs and num_splits > 1:
            raise ValueError(f"probs: stored by one split only, got num_splits={num_splits}")
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
            paged=paged,
        )
        self.dtype, self.device = q.dtype, q.device
        self.num_splits, self.varlen = num_splits, varlen
        split = num_splits > 1
        # Keys per split: a multiple of any BLOCK_N.
        keys_per_split = cdiv(cdiv(constants["seqlen_k"], num_splits), 128) * 128
        # Partial results in fp32, one slice per split; split 0 is where one split writes.
        out_shape = (num_splits, *q.shape) if num_splits > 1 else q.shape
        out_dtype = torch.float32 if num_splits > 1 else q.dtype
        self.out_shape, self.out_dtype = out_shape, out_dtype
        out_strides = contiguous_strides(out_shape)
        lse_shape_all = (num_splits, *lse_shape(q, varlen)) if split else lse_shape(q, varlen)
        self.lse_shape_all = lse_shape_all
        lse_strides_all = contiguous_strides(lse_shape_all)
        self.placeholder = torch.empty(0, dtype=torch.int32, device=q.device)
        seqlen_q, programs = constants["seqlen_q"], batch * constants["nheads"]

        def grid(meta):
            return (programs, cdiv(seqlen_q, meta["BLOCK_M"]), num_splits)

        constants.update(
            stride_v=token_strides(v, varlen and not paged),
            stride_o=token_strides_of(out_strides[1:] if split else out_strides, varlen),
            stride_lse=lse_strides_of(lse_strides_all[1:] if split else lse_strides_all, varlen),
            STORE_PROBS=store_probs,
            RERUN_STAGES=1 if target_arch() >= 90 else 2,
        )
        del constants["HAS_SEQLENS_K"]  # the decoding kernel always reads key ranges
        self.decode = key_ranges or kv_batch_idx or paged or split
        if self.decode:
            constants.update(
                keys_per_split=keys_per_split,
                stride_out_split=out_strides[0] if split else 0,
                stride_lse_split=lse_strides_all[0] if split else 0,
                HAS_KV_BATCH_IDX=kv_batch_idx,
                stride_table_b=block_table.stride(0) if paged else 0,
                page_size=k.shape[1] if paged else 1,
                PAGED=paged,
                SPLIT_KV=split,
            )
        kernel = _attn_decode_kernel if self.decode else _attn_fwd_kernel
        kernel, config = kernel_config("fwd", kernel, constants, q.dtype)
        # The decoding kernel also reads each batch entry's key range, cache row and pages.
        decoding = ("SeqlensK", "KBatchIdx", "BlockTable") if self.decode else ()
        tensors = ("V", "Out", "Lse", "P", *decoding, *KERNEL_TENSORS)
        self.launch = LaunchPlan(kernel, grid, tensors, **constants, **config)

    def __call__(
        self,
        q,
        k,
        v,
        *,
        bias=None,
        alibi_slopes=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        key_ranges=None,
        seed=None,
        k_batch_idx=None,
        block_table=None,
        probs=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse): out like q, contiguous; lse (batch, nheads, seqlen_q), or (nheads,
        total_q) for varlen, fp32, natural log, +inf for rows with no visible key. The tensors
        as :class:`ForwardLaunch` was told (seed (1,) int64 when opts.dropout_p > 0)."""
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        lse = torch.empty(self.lse_shape_all, dtype=torch.float32, device=self.device)
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
        decoding = ()
        if self.decode:
            decoding = tuple(
                t if t is not None else placeholder for t in (key_ranges, k_batch_idx, block_table)
            )
        with device_guard(q):
            self.launch(v, out, lse, probs if probs is not None else out, *decoding, *tensors)
        if self.num_splits == 1:
            return out, lse
        return _combine_splits(out, lse, self.dtype, self.varlen)


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this shape."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def token_strides_of(strides, varlen: bool) -> tuple[int, int, int]:
    """:func:`token_strides` of a tensor with these strides."""
    return (0, strides[0], strides[1]) if varlen else tuple(strides[:3])


def lse_strides_of(strides, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of an lse with these strides ((B, H, Sq), or varlen (H, total_q):
    batch 0), the kernels' stride_lse."""
    return (0 if varlen else strides[-3], strides[-2])


def attention_fwd(
    q,
    k,
    v,
    opts: AttentionOptions,
    *,
    bias=None,
    alibi_slopes=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seed=None,
    seqlens_k=None,
    cache_leftpad=None,
    key_ranges=None,
    num_splits: int = 1,
    k_batch_idx=None,
    block_table=None,
    probs=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel once (:class:`ForwardLaunch` built and called): (out, lse).

    KV-cache decoding: ``seqlens_k`` (B,) int32, where each batch entry's keys end in its cache
    row, ``cache_leftpad`` (B,) int32 or None, where they start (0 by default). With varlen
    offsets and ``block_table``, cu_seqlens_k counts the keys of each sequence, which start at
    position 0 of its pages. Or ``key_ranges`` made by :func:`key_ranges_of` from those. Other
    arguments: see :class:`ForwardLaunch`.
    """
    varlen = cu_seqlens_q is not None
    if key_ranges is None:
        paged_varlen = varlen and block_table is not None
        cu_seqlens_k_paged = cu_seqlens_k if paged_varlen else None
        key_ranges = key_ranges_of(seqlens_k, cache_leftpad, cu_seqlens_k_paged)
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    launch = ForwardLaunch(
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
        key_ranges=key_ranges is not None,
        num_splits=num_splits,
        kv_batch_idx=k_batch_idx is not None,
        block_table=block_table,
        store_probs=probs is not None,
    )
    return launch(
        q,
        k,
        v,
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        key_ranges=key_ranges,
        seed=seed,
        k_batch_idx=k_batch_idx,
        block_table=block_table,
        probs=probs,
    )


def _combine_splits(out, lse, dtype, varlen):
    """Merge per-split (out, lse): out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s."""
    lse_parts = lse.masked_fill(lse == float("inf"), float("-inf"))  # empty split: weight 0
    lse_total = torch.logsumexp(lse_parts, dim=0)
    weights = torch.exp(lse_parts - lse_total).nan_to_num(0.0)  # all splits empty: 0
    # (S, B, H, Sq) -> (S, B, Sq, H, 1), or varlen (S, H, T) -> (S, T, H, 1)
    weights = weights.transpose(-1, -2).unsqueeze(-1)
    combined = (weights * out).sum(dim=0).to(dtype)
    return combined, lse_total.masked_fill(lse_total == float("-inf"), float("inf"))
