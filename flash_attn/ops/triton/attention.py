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
that attends to nothing (its output is zero, never NaN).

Dropout draws from Philox keyed by a seed tensor and the element's position
((batch * nheads + head) * max_seqlen_q + i) * max_seqlen_k + j, so the backward regenerates
the mask instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.triton.launch import device_guard

LOG2E = tl.constexpr(1.4426950408889634)


def autotune_configs(block_ms, block_ns, warps, stages):
    """Autotune candidates; a single large-block config under the CPU interpreter."""
    if interpreter_enabled():
        # The interpreter runs programs one by one in NumPy: few, large blocks are fastest.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in block_ms
        for bn in block_ns
        for w in warps
        for s in stages
    ]


def _prune_for_head_dim(configs, named_args, **kwargs):
    """Large head dims need smaller tiles to fit the accumulator in registers/SRAM."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    limit = 128 * 64 if head_dim <= 128 else 64 * 64
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


# Retune when head dim, masking or the order of magnitude of the lengths change.
TUNE_KEY = ["HEAD_DIM", "MASK_WINDOW", "DROPOUT", "HAS_BIAS", "seqlen_q_bucket", "seqlen_k_bucket"]
PRUNE = {"early_config_prune": _prune_for_head_dim}


# ---------------------------------------------------------------------------------------------
# Pieces shared by every attention kernel


@triton.jit
def sequence(
    CuSeqlensQ,
    CuSeqlensK,
    SeqlensK,
    off_b,
    seqlen_q,
    seqlen_k,
    VARLEN: tl.constexpr,
    HAS_SEQLENS_K: tl.constexpr,
):
    """(q_start, seqlen_q, k_start, seqlen_k) of batch entry off_b: its first row in the token
    dimension and its lengths (packed varlen batches, or per-batch cache lengths)."""
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CuSeqlensQ + off_b)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqlensK + off_b)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start
    if HAS_SEQLENS_K:
        seqlen_k = tl.load(SeqlensK + off_b)
    return q_start, seqlen_q, k_start, seqlen_k


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
    """[lo, hi) of the keys that some query of the block starting at start_m can see; lo is a
    multiple of BLOCK_N."""
    diag = seqlen_k - seqlen_q
    lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + diag + window_right, seqlen_k)
    return lo, hi


@triton.jit
def query_range(
    start_n,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[lo, hi) of the queries that can see some key of the block starting at start_n; lo is a
    multiple of BLOCK_M."""
    diag = seqlen_k - seqlen_q
    lo = tl.maximum(start_n - diag - window_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - diag + window_left, seqlen_q)
    return lo, hi


@triton.jit
def tanh(x):
    """tanh from sigmoid: one formula for the compiled kernels and the CPU interpreter."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def scores(
    qk,
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    softmax_scale,
    softcap,
    bias_base,
    stride_bias_m,
    stride_bias_n,
    slope,
    window_left,
    window_right,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
):
    """Attention scores of a (BLOCK_M, BLOCK_N) tile from its q k^T, in natural-log units and
    -inf where not visible, with d(score)/d(q k^T * softmax_scale) from the softcap (1 without)."""
    s = qk * softmax_scale
    dsoftcap = 1.0
    if SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
        dsoftcap = 1.0 - t * t
    visible = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if HAS_BIAS:
        bias = tl.load(
            bias_base + rows[:, None] * stride_bias_m + cols[None, :] * stride_bias_n,
            mask=visible,
            other=0.0,
        )
        s += bias.to(tl.float32)
    distance = cols[None, :] - rows[:, None] - (seqlen_k - seqlen_q)
    if HAS_ALIBI:
        s -= slope * tl.abs(distance).to(tl.float32)
    if MASK_WINDOW:
        visible = visible & (distance >= -window_left) & (distance <= window_right)
    return tl.where(visible, s, float("-inf")), dsoftcap


@triton.jit
def key_offsets(cols, in_keys, BlockTable, off_b, stride_table_b, page_size, stride_b, stride_n,
                PAGED: tl.constexpr):  # fmt: skip
    """Offsets of keys ``cols`` from their cache row: cols * stride_n, or, in a paged cache,
    through the batch entry's page table (page p of the sequence is cache row BlockTable[b, p])."""
    offsets = cols * stride_n
    if PAGED:
        page = tl.load(BlockTable + off_b * stride_table_b + cols // page_size, mask=in_keys,
                       other=0)  # fmt: skip
        offsets = page.to(tl.int64) * stride_b + (cols % page_size) * stride_n
    return offsets


@triton.jit
def dropout_keep(seed, bh, max_seqlen_q, max_seqlen_k, rows, cols, dropout_p):
    """(len(rows), len(cols)) bool, True where the weight at (row, col) of head bh is kept."""
    offsets = (bh.to(tl.int64) * max_seqlen_q + rows[:, None]) * max_seqlen_k + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


# ---------------------------------------------------------------------------------------------
# Forward


@triton.autotune(
    configs=autotune_configs([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]),
    key=TUNE_KEY,
    prune_configs_by=PRUNE,
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D); varlen: no B, stride_*b = 0
    Out,  # like Q, contiguous
    Lse,  # (B, H, Sq) or varlen (H, total_q), fp32
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32, read when VARLEN
    SeqlensK,  # (B,) int32 keys per batch entry (KV cache), read when HAS_SEQLENS_K
    KBatchIdx,  # (B,) int32 batch entry of k/v for each of q's (KV cache), when HAS_KV_BATCH_IDX
    Bias,  # broadcastable to (B, H, Sq, Sk), read when HAS_BIAS
    Slopes,  # (H,) or (B, H) fp32, read when HAS_ALIBI
    Seed,  # (1,) int64, read when DROPOUT
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, stride_slope_b,
    stride_lse_b, stride_lse_h,
    keys_per_split, stride_out_split, stride_lse_split,  # split-KV: one slice of keys each
    BlockTable, stride_table_b, page_size,  # paged cache: (B, pages) int32, read when PAGED
    nheads, nheads_k, seqlen_q, seqlen_k, head_dim,
    softmax_scale, softcap, dropout_p, window_left, window_right,
    seqlen_q_bucket, seqlen_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, MASK_WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    off_hk = off_h // (nheads // nheads_k)
    max_seqlen_q = seqlen_q
    max_seqlen_k = seqlen_k
    q_start, seqlen_q, k_start, seqlen_k = sequence(
        CuSeqlensQ, CuSeqlensK, SeqlensK, off_b, seqlen_q, seqlen_k, VARLEN, HAS_SEQLENS_K
    )
    if start_m >= seqlen_q:
        return
    off_bk = off_b
    if HAS_KV_BATCH_IDX:
        off_bk = tl.load(KBatchIdx + off_b)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim

    # q stays in SRAM for the whole loop over keys.
    q_ptrs = (
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + (q_start + rows[:, None]) * stride_qm
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=(rows[:, None] < seqlen_q) & in_dim[None, :], other=0.0)
    if PAGED:
        off_bk = 0  # each key's page gives its row below
    k_base = K + off_bk * stride_kb + off_hk * stride_kh + k_start * stride_kn
    v_base = V + off_bk * stride_vb + off_hk * stride_vh + k_start * stride_vn
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_slope_b + off_h)
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, hi = key_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N)
    # Split-KV: program_id(2) takes keys [split * keys_per_split, (split + 1) * keys_per_split),
    # a multiple of BLOCK_N, and writes a partial result that the launcher combines.
    split = tl.program_id(2)
    lo = tl.maximum(lo, split * keys_per_split)
    hi = tl.minimum(hi, (split + 1) * keys_per_split)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_keys = cols < seqlen_k
        k_offs = key_offsets(cols, in_keys, BlockTable, off_b, stride_table_b, page_size,
                             stride_kb, stride_kn, PAGED)  # fmt: skip
        v_offs = key_offsets(cols, in_keys, BlockTable, off_b, stride_table_b, page_size,
                             stride_vb, stride_vn, PAGED)  # fmt: skip
        kT = tl.load(
            k_base + k_offs[None, :] + offs_d[:, None],
            mask=in_keys[None, :] & in_dim[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + v_offs[:, None] + offs_d[None, :],
            mask=in_keys[:, None] & in_dim[None, :],
            other=0.0,
        )
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, _ = scores(
            qk,
            rows,
            cols,
            seqlen_q,
            seqlen_k,
            softmax_scale,
            softcap,
            bias_base,
            stride_bias_m,
            stride_bias_n,
            slope,
            window_left,
            window_right,
            SOFTCAP,
            HAS_BIAS,
            HAS_ALIBI,
            MASK_WINDOW,
        )
        s = s * LOG2E  # exp2 is cheaper than exp
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, bh, max_seqlen_q, max_seqlen_k, rows, cols, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    lse_ptrs = Lse + split * stride_lse_split + off_b * stride_lse_b + off_h * stride_lse_h
    tl.store(lse_ptrs + q_start + rows, lse, mask=rows < seqlen_q)
    o_ptrs = (
        Out
        + split * stride_out_split
        + off_b * stride_ob
        + off_h * stride_oh
        + (q_start + rows[:, None]) * stride_om
        + offs_d[None, :]
    )
    tl.store(
        o_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < seqlen_q) & in_dim[None, :]
    )


@triton.jit
def _attn_probs_kernel(
    Q, K, V, Lse, CuSeqlensQ, CuSeqlensK, SeqlensK, KBatchIdx, Bias, Slopes, Seed,
    P,  # (B, H, max_Sq, max_Sk): probabilities, negated where dropout drops them
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, stride_slope_b,
    stride_lse_b, stride_lse_h,
    nheads, nheads_k, seqlen_q, seqlen_k, head_dim,
    softmax_scale, softcap, dropout_p, window_left, window_right,
    seqlen_q_bucket, seqlen_k_bucket,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, HAS_SEQLENS_K: tl.constexpr,
    HAS_KV_BATCH_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr, MASK_WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    off_hk = off_h // (nheads // nheads_k)
    max_seqlen_q = seqlen_q
    max_seqlen_k = seqlen_k
    q_start, seqlen_q, k_start, seqlen_k = sequence(
        CuSeqlensQ, CuSeqlensK, SeqlensK, off_b, seqlen_q, seqlen_k, VARLEN, HAS_SEQLENS_K
    )
    off_bk = off_b
    if HAS_KV_BATCH_IDX:
        off_bk = tl.load(KBatchIdx + off_b)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    q = tl.load(
        Q
        + off_b * stride_qb
        + off_h * stride_qh
        + (q_start + rows[:, None]) * stride_qm
        + offs_d[None, :],
        mask=(rows[:, None] < seqlen_q) & in_dim[None, :],
        other=0.0,
    )
    lse = tl.load(
        Lse + off_b * stride_lse_b + off_h * stride_lse_h + q_start + rows,
        mask=rows < seqlen_q,
        other=float("inf"),
    )
    k_base = K + off_bk * stride_kb + off_hk * stride_kh + k_start * stride_kn
    bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * stride_slope_b + off_h)
    if DROPOUT:
        seed = tl.load(Seed)
    for start_n in range(0, max_seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None],
            mask=(cols[None, :] < seqlen_k) & in_dim[:, None],
            other=0.0,
        )
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s, _ = scores(
            qk,
            rows,
            cols,
            seqlen_q,
            seqlen_k,
            softmax_scale,
            softcap,
            bias_base,
            stride_bias_m,
            stride_bias_n,
            slope,
            window_left,
            window_right,
            SOFTCAP,
            HAS_BIAS,
            HAS_ALIBI,
            MASK_WINDOW,
        )
        p = tl.math.exp(s - lse[:, None])
        if DROPOUT:
            keep = dropout_keep(seed, bh, max_seqlen_q, max_seqlen_k, rows, cols, dropout_p)
            p = tl.where(keep, p, -p)
        out_offs = (bh.to(tl.int64) * max_seqlen_q + rows[:, None]) * max_seqlen_k + cols[None, :]
        tl.store(
            P + out_offs,
            p.to(P.dtype.element_ty),
            mask=(rows[:, None] < max_seqlen_q) & (cols[None, :] < max_seqlen_k),
        )


# ---------------------------------------------------------------------------------------------
# Launchers


def _strides3(t: torch.Tensor | None, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; batch stride 0 for packed varlen tensors."""
    if t is None:
        return (0, 0, 0)
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def problem(
    q,
    k,
    v,
    *,
    softmax_scale,
    causal=False,
    dropout_p=0.0,
    seed=None,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    bias=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqlens_k=None,
    k_batch_idx=None,
):
    """Everything the attention kernels share, as keyword arguments for any of them.

    Inputs are assumed validated by ``flash_attn.ops.attention``. Shapes as in the module
    docstring; ``bias`` already expanded (stride 0 on broadcast dims) to (B, H, Sq, Sk);
    ``seqlens_k`` (B,) int32 and ``k_batch_idx`` (B,) int32 for KV-cache decoding.
    """
    varlen = cu_seqlens_q is not None
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = max_seqlen_k or k.shape[1]  # a paged cache passes its capacity
    left, right = window_size
    unlimited = seqlen_q + seqlen_k  # farther than any query-key distance
    left = unlimited if left < 0 else left
    right = 0 if causal else (unlimited if right < 0 else right)
    placeholder = torch.empty(0, dtype=torch.int32, device=q.device)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    slope_stride = 0
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        slope_stride = alibi_slopes.stride(0)
    return dict(
        Q=q,
        K=k,
        V=v,
        CuSeqlensQ=cu_seqlens_q if varlen else placeholder,
        CuSeqlensK=cu_seqlens_k if varlen else placeholder,
        SeqlensK=seqlens_k if seqlens_k is not None else placeholder,
        KBatchIdx=k_batch_idx if k_batch_idx is not None else placeholder,
        Bias=bias if bias is not None else placeholder,
        Slopes=alibi_slopes if alibi_slopes is not None else placeholder,
        Seed=seed if seed is not None else placeholder,
        **dict(zip(("stride_qb", "stride_qm", "stride_qh"), _strides3(q, varlen))),
        **dict(zip(("stride_kb", "stride_kn", "stride_kh"), _strides3(k, varlen))),
        **dict(zip(("stride_vb", "stride_vn", "stride_vh"), _strides3(v, varlen))),
        **dict(
            zip(("stride_bias_b", "stride_bias_h", "stride_bias_m", "stride_bias_n"), bias_strides)
        ),
        stride_slope_b=slope_stride,
        nheads=nheads,
        nheads_k=nheads_k,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        softmax_scale=softmax_scale,
        softcap=softcap,
        dropout_p=dropout_p,
        window_left=left,
        window_right=right,
        seqlen_q_bucket=triton.next_power_of_2(seqlen_q),
        seqlen_k_bucket=triton.next_power_of_2(seqlen_k),
        HEAD_DIM=max(16, triton.next_power_of_2(head_dim)),
        VARLEN=varlen,
        HAS_SEQLENS_K=seqlens_k is not None,
        HAS_KV_BATCH_IDX=k_batch_idx is not None,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=alibi_slopes is not None,
        SOFTCAP=softcap > 0.0,
        MASK_WINDOW=left < unlimited or right < unlimited,
        DROPOUT=dropout_p > 0.0,
        # fp32 inputs get full-precision products, to match torch.matmul's default (no TF32).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    ), batch


def _lse_shape(q, args, batch):
    """Lse as the official API lays it out: (B, H, Sq), or (H, total_q) for varlen."""
    if args["VARLEN"]:
        return (args["nheads"], q.shape[0])
    return (batch, args["nheads"], args["seqlen_q"])


def lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    """Kernel arguments locating lse[b, h] ((B, H, Sq), or varlen (H, total_q): no b)."""
    return dict(stride_lse_b=0 if varlen else lse.stride(-3), stride_lse_h=lse.stride(-2))


def attention_fwd(
    q, k, v, num_splits: int = 1, block_table: torch.Tensor | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q, k, v and options: see :func:`problem` (softmax_scale is required).
        num_splits: split the keys across this many programs per query block (split-KV, for
            decoding with few queries and a long cache); partial results are combined here.
        block_table: (batch, max_pages) int32 for a paged cache: k and v are then
            (num_pages, page_size, nheads_k, headdim) and key j of batch entry b lives at
            [block_table[b, j // page_size], j % page_size]; seqlens_k gives the lengths.
    Returns:
        out: like q, contiguous; lse: (batch, nheads, seqlen_q), or (nheads, total_q) for
        varlen, fp32, natural log, +inf for rows with no visible key.
    """
    args, batch = problem(q, k, v, **options)
    varlen = args["VARLEN"]
    lse_shape = _lse_shape(q, args, batch)
    if num_splits > 1:
        # Partial results in fp32, one slice per split; keys per split a multiple of any BLOCK_N.
        out = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, *lse_shape), dtype=torch.float32, device=q.device)
        keys_per_split = triton.cdiv(triton.cdiv(args["seqlen_k"], num_splits), 128) * 128
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        keys_per_split = triton.cdiv(args["seqlen_k"], 128) * 128
    split_strides = (out.stride(0), lse.stride(0)) if num_splits > 1 else (0, 0)
    stride_ob, stride_om, stride_oh = _strides3(out[0] if num_splits > 1 else out, varlen)

    def grid(meta):
        return (triton.cdiv(args["seqlen_q"], meta["BLOCK_M"]), batch * args["nheads"], num_splits)

    with device_guard(q):
        _attn_fwd_kernel[grid](
            Out=out,
            Lse=lse,
            stride_ob=stride_ob,
            stride_om=stride_om,
            stride_oh=stride_oh,
            keys_per_split=keys_per_split,
            stride_out_split=split_strides[0],
            stride_lse_split=split_strides[1],
            BlockTable=block_table if block_table is not None else args["SeqlensK"],
            stride_table_b=block_table.stride(0) if block_table is not None else 0,
            page_size=k.shape[1] if block_table is not None else 1,
            PAGED=block_table is not None,
            **lse_strides(lse, varlen),
            **args,
        )
    if num_splits == 1:
        return out, lse
    return _combine_splits(out, lse, q.dtype, varlen)


def _combine_splits(out, lse, dtype, varlen):
    """Merge per-split (out, lse): out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s."""
    lse_parts = lse.masked_fill(lse == float("inf"), float("-inf"))  # empty split: weight 0
    lse_total = torch.logsumexp(lse_parts, dim=0)
    weights = torch.exp(lse_parts - lse_total).nan_to_num(0.0)  # all splits empty: 0
    # (S, B, H, Sq) -> (S, B, Sq, H, 1), or varlen (S, H, T) -> (S, T, H, 1)
    weights = weights.transpose(-1, -2).unsqueeze(-1)
    combined = (weights * out).sum(dim=0).to(dtype)
    return combined, lse_total.masked_fill(lse_total == float("-inf"), float("inf"))


def attention_probs(q, k, v, lse, **options) -> torch.Tensor:
    """The forward's attention probabilities, for tests (the official ``S_dmask``).

    Returns:
        (batch, nheads, max_seqlen_q, max_seqlen_k) in q's dtype: softmax probabilities before
        dropout, negated where dropout dropped the weight.
    """
    args, batch = problem(q, k, v, **options)
    nheads, seqlen_q, seqlen_k = args["nheads"], args["seqlen_q"], args["seqlen_k"]
    probs = torch.zeros((batch, nheads, seqlen_q, seqlen_k), dtype=q.dtype, device=q.device)
    with device_guard(q):
        _attn_probs_kernel[(triton.cdiv(seqlen_q, 64), batch * nheads)](
            Lse=lse,
            P=probs,
            stride_ob=0,
            stride_om=0,
            stride_oh=0,
            **lse_strides(lse, args["VARLEN"]),
            BLOCK_M=64,
            BLOCK_N=64,
            **args,
        )
    return probs
