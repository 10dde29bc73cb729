"""FlashAttention-2 forward and backward in Triton, and their launchers.

Layout: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim), any
strides with a unit last stride. Query head h reads key/value head h // (nheads // nheads_k).
The causal mask is aligned to the bottom-right corner (query i sees keys j <= i + seqlen_k -
seqlen_q). No sequence length has to be a multiple of a block: loads and stores are masked.

Numerics: scores are scaled by softmax_scale * log2(e) so the softmax uses exp2; the running
max, running sum and the output accumulator stay in fp32; the log-sum-exp is stored in natural
log units, +inf for a row that attends to nothing (its output is zero, never NaN).

Dropout draws from Philox keyed by a seed tensor and the element's position
((batch * nheads + head) * seqlen_q + i) * seqlen_k + j, so the backward regenerates the mask
instead of storing it. The backward runs two kernels (dK/dV per key block, dQ per query block)
that each own their output rows: no atomics, so it is bit-reproducible.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled

LOG2E = 1.4426950408889634


def _configs(block_ms, block_ns, warps, stages):
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
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "DROPOUT", "seqlen_q_bucket", "seqlen_k_bucket"]
_PRUNE = {"early_config_prune": _prune_for_head_dim}


@triton.jit
def _dropout_keep(seed, bh, seqlen_q, seqlen_k, rows, cols, dropout_p):
    """(len(rows), len(cols)) bool, True where the weight at (row, col) of head bh is kept."""
    offsets = (bh.to(tl.int64) * seqlen_q + rows[:, None]) * seqlen_k + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _visible(rows, cols, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) bool: key col exists and, if causal, row may see it."""
    visible = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (seqlen_k - seqlen_q))
    return visible


@triton.jit
def _causal_key_end(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key that a query block starting at start_m can see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + seqlen_k - seqlen_q), 0)
    return seqlen_k


@triton.autotune(
    configs=_configs([64, 128], [32, 64, 128], [4, 8], [2, 3, 4]),
    key=_TUNE_KEY,
    prune_configs_by=_PRUNE,
)
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,  # (B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D)
    Out,  # (B, Sq, H, D) contiguous
    Lse,  # (B, H, Sq) fp32 contiguous
    Seed,  # (1,) int64, read only when DROPOUT
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_om,
    stride_oh,
    nheads,
    seqlen_q,
    seqlen_k,
    head_dim,
    group_size,
    softmax_scale,
    dropout_p,
    seqlen_q_bucket,
    seqlen_k_bucket,  # autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    off_hk = off_h // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim

    # q stays in SRAM for the whole loop over keys.
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(rows[:, None] < seqlen_q) & in_dim[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    # exp2 with log2(e) folded into the scale.
    qk_scale = softmax_scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Causal: key blocks entirely above the diagonal are never loaded.
    end_n = _causal_key_end(start_m, seqlen_q, seqlen_k, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        in_keys = cols < seqlen_k
        kT = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None],
            mask=in_keys[None, :] & in_dim[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :],
            mask=in_keys[:, None] & in_dim[None, :],
            other=0.0,
        )
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(_visible(rows, cols, seqlen_q, seqlen_k, CAUSAL), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, seqlen_q, seqlen_k, rows, cols, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    tl.store(Lse + bh * seqlen_q + rows, lse, mask=rows < seqlen_q)
    o_ptrs = (
        Out + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :]
    )
    tl.store(
        o_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < seqlen_q) & in_dim[None, :]
    )


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DO,  # (B, Sq, H, D) contiguous
    Delta,  # (B, H, Sq) fp32: rowsum(dO * O), the D_i of the paper's backward
    nheads,
    seqlen_q,
    head_dim,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (rows[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    offs = ((off_b * seqlen_q + rows[:, None]) * nheads + off_h) * head_dim + offs_d[None, :]
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * seqlen_q + rows, tl.sum(o * do, 1), mask=rows < seqlen_q)


@triton.autotune(
    configs=_configs([32, 64, 128], [32, 64, 128], [4, 8], [2, 3]),
    key=_TUNE_KEY,
    prune_configs_by=_PRUNE,
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,  # as in the forward; DO like Out, contiguous
    Lse,
    Delta,  # (B, H, Sq) fp32
    DK,
    DV,  # (B, Sk, Hk, D) contiguous
    Seed,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    nheads,
    nheads_k,
    seqlen_q,
    seqlen_k,
    head_dim,
    group_size,
    softmax_scale,
    dropout_p,
    seqlen_q_bucket,
    seqlen_k_bucket,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_N keys of one key/value head and sums over every query head of
    # its group, so dK and dV are written once, without atomics.
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    off_b = bhk // nheads_k
    off_hk = bhk % nheads_k
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    kv_mask = (cols[:, None] < seqlen_k) & in_dim[None, :]
    k = tl.load(
        K + off_b * stride_kb + off_hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    qk_scale = softmax_scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
        inv_keep = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Causal: query blocks that end before the first query seeing key start_n are skipped.
    start_m0 = 0
    if CAUSAL:
        start_m0 = tl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    for g in range(0, group_size):
        off_h = off_hk * group_size + g
        bh = off_b * nheads + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + (off_b * seqlen_q * nheads + off_h) * head_dim
        for start_m in range(start_m0, seqlen_q, BLOCK_M):
            rows = start_m + offs_m
            q_mask = (rows[:, None] < seqlen_q) & in_dim[None, :]
            q = tl.load(
                q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0
            )
            do = tl.load(
                do_base + rows[:, None] * (nheads * head_dim) + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            # Padding rows read lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(Lse + bh * seqlen_q + rows, mask=rows < seqlen_q, other=float("inf"))
            delta = tl.load(Delta + bh * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)
            # Transposed tiles, (BLOCK_N, BLOCK_M): rows of the result are this program's keys.
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            pT = tl.math.exp2(qkT - lse[None, :] * 1.4426950408889634)
            visibleT = tl.trans(_visible(rows, cols, seqlen_q, seqlen_k, CAUSAL))
            pT = tl.where(visibleT, pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                keepT = tl.trans(_dropout_keep(seed, bh, seqlen_q, seqlen_k, rows, cols, dropout_p))
                dv += tl.dot(
                    tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype),
                    do,
                    input_precision=DOT_PRECISION,
                )
                dpT = tl.where(keepT, dpT * inv_keep, 0.0)
            else:
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * softmax_scale
    out_offs = ((off_b * seqlen_k + cols[:, None]) * nheads_k + off_hk) * head_dim + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=_configs([32, 64, 128], [32, 64, 128], [4, 8], [2, 3]),
    key=_TUNE_KEY,
    prune_configs_by=_PRUNE,
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,  # (B, Sq, H, D) contiguous
    Seed,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    nheads,
    seqlen_q,
    seqlen_k,
    head_dim,
    group_size,
    softmax_scale,
    dropout_p,
    seqlen_q_bucket,
    seqlen_k_bucket,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    off_hk = off_h // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    q_mask = (rows[:, None] < seqlen_q) & in_dim[None, :]
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    do_offs = ((off_b * seqlen_q + rows[:, None]) * nheads + off_h) * head_dim + offs_d[None, :]
    do = tl.load(DO + do_offs, mask=q_mask, other=0.0)
    lse = tl.load(Lse + bh * seqlen_q + rows, mask=rows < seqlen_q, other=float("inf"))
    delta = tl.load(Delta + bh * seqlen_q + rows, mask=rows < seqlen_q, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    qk_scale = softmax_scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
        inv_keep = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    end_n = _causal_key_end(start_m, seqlen_q, seqlen_k, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & in_dim[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None] * 1.4426950408889634)
        p = tl.where(_visible(rows, cols, seqlen_q, seqlen_k, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, seqlen_q, seqlen_k, rows, cols, dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + do_offs, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_probs_kernel(
    Q,
    K,
    Lse,
    Seed,
    P,  # (B, H, Sq, Sk) contiguous: probabilities, negated where dropout drops them
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    nheads,
    seqlen_q,
    seqlen_k,
    head_dim,
    group_size,
    softmax_scale,
    dropout_p,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // nheads
    off_h = bh % nheads
    off_hk = off_h // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_dim = offs_d < head_dim
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
        mask=(rows[:, None] < seqlen_q) & in_dim[None, :],
        other=0.0,
    )
    lse = tl.load(Lse + bh * seqlen_q + rows, mask=rows < seqlen_q, other=float("inf"))
    qk_scale = softmax_scale * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(Seed)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(
            K
            + off_b * stride_kb
            + off_hk * stride_kh
            + cols[None, :] * stride_kn
            + offs_d[:, None],
            mask=(cols[None, :] < seqlen_k) & in_dim[:, None],
            other=0.0,
        )
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None] * 1.4426950408889634)
        p = tl.where(_visible(rows, cols, seqlen_q, seqlen_k, CAUSAL), p, 0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, seqlen_q, seqlen_k, rows, cols, dropout_p)
            p = tl.where(keep, p, -p)
        out_offs = (bh.to(tl.int64) * seqlen_q + rows[:, None]) * seqlen_k + cols[None, :]
        tl.store(
            P + out_offs,
            p.to(P.dtype.element_ty),
            mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k),
        )


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products, to match torch.matmul's default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _common_args(q, k, softmax_scale, dropout_p, causal):
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    return dict(
        HEAD_DIM=_head_dim_block(head_dim),
        CAUSAL=causal,
        DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype),
    ), (batch, nheads, nheads_k, seqlen_q, seqlen_k, head_dim)


def _buckets(seqlen_q, seqlen_k):
    return triton.next_power_of_2(seqlen_q), triton.next_power_of_2(seqlen_k)


def _seed_arg(seed, device):
    return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are assumed validated (see ``flash_attn.ops.attention``).

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
        seed: (1,) int64 on q's device, required when dropout_p > 0.
    Returns:
        out: (batch, seqlen_q, nheads, headdim) contiguous, q's dtype.
        lse: (batch, nheads, seqlen_q) fp32, natural log, +inf for rows with no visible key.
    """
    consts, (batch, nheads, nheads_k, seqlen_q, seqlen_k, head_dim) = _common_args(
        q, k, softmax_scale, dropout_p, causal
    )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)  # noqa: E731
    with _device_guard(q):
        _attn_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            _seed_arg(seed, q.device),
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            nheads,
            seqlen_q,
            seqlen_k,
            head_dim,
            nheads // nheads_k,
            softmax_scale,
            dropout_p,
            *_buckets(seqlen_q, seqlen_k),
            **consts,
        )
    return out, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: delta = rowsum(dO * O), then dK/dV, then dQ.

    Args:
        do, out: (batch, seqlen_q, nheads, headdim); lse: the forward's (batch, nheads, seqlen_q).
        q, k, v, softmax_scale, causal, dropout_p, seed: exactly as given to the forward.
    Returns:
        dq (batch, seqlen_q, nheads, headdim), dk and dv (batch, seqlen_k, nheads_k, headdim),
        contiguous, in the inputs' dtypes.
    """
    consts, (batch, nheads, nheads_k, seqlen_q, seqlen_k, head_dim) = _common_args(
        q, k, softmax_scale, dropout_p, causal
    )
    do = do.contiguous()
    out = out.contiguous()
    seed = _seed_arg(seed, q.device)
    buckets = _buckets(seqlen_q, seqlen_k)
    strides = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
    )
    delta = torch.empty_like(lse)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    with _device_guard(q):
        _attn_bwd_delta_kernel[(triton.cdiv(seqlen_q, 64), batch * nheads)](
            out, do, delta, nheads, seqlen_q, head_dim, HEAD_DIM=consts["HEAD_DIM"], BLOCK_M=64
        )
        grid_kv = lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * nheads_k)  # noqa: E731
        _attn_bwd_dkdv_kernel[grid_kv](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            seed,
            *strides,
            nheads,
            nheads_k,
            seqlen_q,
            seqlen_k,
            head_dim,
            nheads // nheads_k,
            softmax_scale,
            dropout_p,
            *buckets,
            **consts,
        )
        grid_q = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)  # noqa: E731
        _attn_bwd_dq_kernel[grid_q](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            seed,
            *strides,
            nheads,
            seqlen_q,
            seqlen_k,
            head_dim,
            nheads // nheads_k,
            softmax_scale,
            dropout_p,
            *buckets,
            **consts,
        )
    return dq, dk, dv


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward's attention probabilities, for tests (the official ``S_dmask``).

    Returns:
        (batch, nheads, seqlen_q, seqlen_k) in q's dtype: softmax probabilities before dropout,
        negated where dropout dropped the weight.
    """
    consts, (batch, nheads, nheads_k, seqlen_q, seqlen_k, head_dim) = _common_args(
        q, k, softmax_scale, dropout_p, causal
    )
    probs = torch.empty((batch, nheads, seqlen_q, seqlen_k), dtype=q.dtype, device=q.device)
    with _device_guard(q):
        _attn_probs_kernel[(triton.cdiv(seqlen_q, 64), batch * nheads)](
            q,
            k,
            lse,
            _seed_arg(seed, q.device),
            probs,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            nheads,
            seqlen_q,
            seqlen_k,
            head_dim,
            nheads // nheads_k,
            softmax_scale,
            dropout_p,
            BLOCK_M=64,
            BLOCK_N=64,
            **consts,
        )
    return probs
