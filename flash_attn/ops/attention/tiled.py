"""The FlashAttention algorithm, tile by tile, in plain PyTorch: the paper written out.

Standard attention materialises S = Q K^T and P = softmax(S), two (seqlen_q, seqlen_k)
matrices per head. FlashAttention (Dao et al., 2022; loop order of FlashAttention-2) never
holds more than one (block_m, block_n) tile of them:

- forward: for each block of queries Q_i, walk over the blocks of keys K_j, V_j keeping a
  running row max m_i, a running row sum l_i and an unnormalised output O_i; when the max
  grows, rescale what was accumulated so far. Save O and the log-sum-exp L = m + log(l).
- backward: recompute each tile P_ij = exp(S_ij - L_i) from the saved L instead of storing
  P, and use D_i = rowsum(dO_i * O_i) for the softmax gradient dS = P * (dP - D).

This file is for reading and for checking: the loops run in Python, one tile at a time, each
tile batched over (batch, heads). The kernels in ``flash_attn/ops/attention/triton/forward.py`` are
the same algorithm with one program per block.

Layout: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim);
query head h reads key/value head h // (nheads // nheads_k). Internally heads are split as
(nheads_k, group): a tile of Q has shape (B, Hk, G, block_m, D) and a tile of K has shape
(B, Hk, 1, block_n, D), so a key/value head is broadcast over its group, never copied.

Masking: ``mask`` is a boolean tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k),
True where query i may attend key j; ``causal`` adds the bottom-right aligned causal mask of
:func:`flash_attn.ops.attention.reference.causal_allowed`. A row that may attend to nothing
gets a zero output, L = +inf and zero (finite) gradients.

Numerics: m, l, O and the gradient accumulators are kept in fp32 for fp16/bf16 inputs (as
the kernels do), in the input dtype otherwise (so fp64 inputs give an fp64 oracle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "AttentionTiledFunction",
    "Tiling",
    "attention_tiled",
    "attention_tiled_bwd",
    "attention_tiled_fwd",
]


@dataclass(frozen=True)
class Tiling:
    """What the tiled algorithm takes besides the tensors it works on.

    softmax_scale: None for 1 / sqrt(headdim). causal: the bottom-right aligned causal mask.
    mask: bool, broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = may attend.
    block_m, block_n: rows of a query block and of a key block (any positive int; they need
    not divide the sequence lengths).
    """

    softmax_scale: float | None = None
    causal: bool = False
    mask: torch.Tensor | None = None
    block_m: int = 64
    block_n: int = 64


# ----------------------------------------------------------------------------- helpers


def _check_inputs(q, k, v, mask, block_m, block_n):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (batch, seqlen, heads, headdim)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    batch, _, nheads, headdim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != batch or k.shape[3] != headdim:
        raise ValueError(
            f"k must be (batch={batch}, seqlen_k, nheads_k, headdim={headdim}), "
            f"got {tuple(k.shape)}"
        )
    if nheads % k.shape[2] != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_k ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True = may attend)")
        full = (batch, nheads, q.shape[1], k.shape[1])
        try:
            torch.broadcast_shapes(mask.shape, full)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to "
                f"(batch, nheads, seqlen_q, seqlen_k) = {full}"
            ) from None
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got {mask.dim()}")


def _grouped_mask(mask, batch, nheads_k, group, seqlen_q, seqlen_k):
    """mask broadcast (as a view) to (B, Hk, G, Sq, Sk), or None."""
    if mask is None:
        return None
    # (.., Sq, Sk) -> (B, H, Sq, Sk) -> (B, Hk, G, Sq, Sk), all views
    full = mask.expand(batch, nheads_k * group, seqlen_q, seqlen_k)
    return full.unflatten(1, (nheads_k, group))


def _tile_allowed(mask5, causal, rows: slice, cols: slice, seqlen_q, seqlen_k, device):
    """Boolean tile (.., block_m, block_n) of the allowed pairs, or None when all are allowed."""
    allowed = None
    if causal:
        i = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
        j = torch.arange(cols.start, cols.stop, device=device).unsqueeze(0)
        allowed = j <= i + (seqlen_k - seqlen_q)  # bottom-right aligned, as causal_allowed
    if mask5 is not None:
        tile = mask5[..., rows, cols]
        allowed = tile if allowed is None else tile & allowed
    return allowed


def _causal_skips(causal, rows: slice, cols: slice, seqlen_q, seqlen_k) -> bool:
    """True when the whole key block lies above the diagonal for the whole query block."""
    return causal and cols.start > (rows.stop - 1) + (seqlen_k - seqlen_q)


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs accumulate in fp32, like the kernels; fp32/fp64 keep their dtype.
    return torch.promote_types(dtype, torch.float32)


def _split_heads(x, nheads_k):
    # (B, S, H, D) -> (B, Hk, G, S, D): query heads of one key/value head are contiguous
    return x.unflatten(2, (nheads_k, -1)).permute(0, 2, 3, 1, 4)


def _merge_heads(x):
    # (B, Hk, G, S, D) -> (B, S, H, D)
    return x.permute(0, 3, 1, 2, 4).flatten(2, 3)


def _prepare(q, k, v, tiling: Tiling):
    """Checked inputs split into key/value head groups: (Q, K, V, mask5, scale, acc_dtype)."""
    softmax_scale, mask = tiling.softmax_scale, tiling.mask
    _check_inputs(q, k, v, mask, tiling.block_m, tiling.block_n)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    Q = _split_heads(q, nheads_k)  # (B, Hk, G, Sq, D)
    K = _split_heads(k, nheads_k)  # (B, Hk, 1, Sk, D)
    V = _split_heads(v, nheads_k)  # (B, Hk, 1, Sk, D)
    mask5 = _grouped_mask(mask, batch, nheads_k, nheads // nheads_k, seqlen_q, seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    return Q, K, V, mask5, scale, _acc_dtype(q.dtype)


# ----------------------------------------------------------------------------- forward


def attention_tiled_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiling: Tiling
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward (online softmax), plain differentiable PyTorch.

    Autograd can differentiate straight through these loops (that is how
    ``scripts/check_backward.py`` compares it with standard attention); :func:`attention_tiled`
    instead uses the paper's backward, :func:`attention_tiled_bwd`.

    Args:
        q: (batch, seqlen_q, nheads, headdim), float dtype.
        k, v: (batch, seqlen_k, nheads_k, headdim), q's dtype; nheads % nheads_k == 0.
        tiling: scale, masks and block sizes (:class:`Tiling`).
    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype.
        lse: (batch, nheads, seqlen_q), accumulation dtype (fp32 for fp16/bf16 inputs),
            natural-log log-sum-exp of the scaled scores, +inf for rows that see no key.
    """
    Q, K, V, mask5, scale, acc_dtype = _prepare(q, k, v, tiling)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    causal = tiling.causal

    O_blocks, L_blocks = [], []
    for rows in _blocks(seqlen_q, tiling.block_m):
        # Load Q_i; initialise O_i = 0, l_i = 0, m_i = -inf (paper, Algorithm 1, lines 2 and 6).
        Q_i = Q[..., rows, :].to(acc_dtype)
        O_i = Q_i.new_zeros(Q_i.shape)  # (B, Hk, G, Br, D), unnormalised
        l_i = Q_i.new_zeros(Q_i.shape[:-1])  # (B, Hk, G, Br) running sum of exp
        m_i = Q_i.new_full(Q_i.shape[:-1], float("-inf"))  # (B, Hk, G, Br) running max
        for cols in _blocks(seqlen_k, tiling.block_n):
            if _causal_skips(causal, rows, cols, seqlen_q, seqlen_k):
                break  # every later key block is above the diagonal too
            allowed = _tile_allowed(mask5, causal, rows, cols, seqlen_q, seqlen_k, q.device)
            if allowed is not None and not bool(allowed.any()):
                continue  # nothing visible in this tile: it would add exp(-inf) = 0
            # Load K_j, V_j.
            K_j = K[..., cols, :].to(acc_dtype)
            V_j = V[..., cols, :].to(acc_dtype)
            # S_ij = scale * Q_i K_j^T, masked pairs set to -inf.   (B, Hk, G, Br, Bc)
            S_ij = scale * (Q_i @ K_j.transpose(-1, -2))
            if allowed is not None:
                S_ij = S_ij.masked_fill(~allowed, float("-inf"))
            # m_i_new = max(m_i, rowmax(S_ij)).
            m_i_new = torch.maximum(m_i, S_ij.amax(dim=-1))
            # A row that has seen no visible key keeps m = -inf: shift by 0 to avoid inf - inf.
            m_shift = torch.where(torch.isneginf(m_i_new), torch.zeros_like(m_i_new), m_i_new)
            # P~_ij = exp(S_ij - m_i_new): this tile's unnormalised probabilities.
            P_ij = torch.exp(S_ij - m_shift.unsqueeze(-1))
            # alpha = exp(m_i - m_i_new) rescales what was accumulated under the old max.
            alpha = torch.exp(m_i - m_shift)
            # l_i = alpha * l_i + rowsum(P~_ij).
            l_i = alpha * l_i + P_ij.sum(dim=-1)
            # O_i = alpha * O_i + P~_ij V_j.
            O_i = alpha.unsqueeze(-1) * O_i + P_ij @ V_j
            m_i = m_i_new
        # Normalise once at the end: O_i = O_i / l_i (rows with l_i = 0 stay zero).
        empty = l_i == 0
        l_safe = torch.where(empty, torch.ones_like(l_i), l_i)
        O_blocks.append(O_i / l_safe.unsqueeze(-1))
        # L_i = m_i + log(l_i), the row's log-sum-exp: all the backward needs to rebuild P.
        L_i = m_i + torch.log(l_safe)
        L_blocks.append(L_i.masked_fill(empty, float("inf")))

    O = torch.cat(O_blocks, dim=-2)  # (B, Hk, G, Sq, D)
    L = torch.cat(L_blocks, dim=-1)  # (B, Hk, G, Sq)
    out = _merge_heads(O).to(q.dtype)  # (B, Sq, H, D)
    lse = L.flatten(1, 2)  # (B, Hk, G, Sq) -> (B, H, Sq)
    return out, lse


# ----------------------------------------------------------------------------- backward


def attention_tiled_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tiling: Tiling,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's backward: recompute each tile of P from L, never store P.

    Loop order of FlashAttention-2: the outer loop owns a key block (dK_j, dV_j are finished
    when it ends), the inner loop walks the query blocks and adds into dQ_i.

    Args:
        do, out: (batch, seqlen_q, nheads, headdim); lse: (batch, nheads, seqlen_q) as returned
            by :func:`attention_tiled_fwd`.
        q, k, v, tiling: as given to the forward.
    Returns:
        dq (batch, seqlen_q, nheads, headdim), dk and dv (batch, seqlen_k, nheads_k, headdim),
        in the inputs' dtype.
    """
    Q, K, V, mask5, scale, acc_dtype = _prepare(q, k, v, tiling)
    seqlen_q, seqlen_k, nheads_k = q.shape[1], k.shape[1], k.shape[2]
    causal = tiling.causal
    dO = _split_heads(do, nheads_k)  # (B, Hk, G, Sq, D)
    O = _split_heads(out, nheads_k)  # (B, Hk, G, Sq, D)
    L = lse.unflatten(1, (nheads_k, -1)).to(acc_dtype)  # (B, H, Sq) -> (B, Hk, G, Sq)

    # D = rowsum(dO * O) (Algorithm 2 of FlashAttention-2, line 4): the row term of the softmax
    # gradient, sum_j P_ij dP_ij, computed from O instead of from P.
    D = (dO.to(acc_dtype) * O.to(acc_dtype)).sum(dim=-1)  # (B, Hk, G, Sq)

    row_blocks = _blocks(seqlen_q, tiling.block_m)
    dQ_blocks = [None] * len(row_blocks)  # dQ_i accumulates over key blocks
    dK_blocks, dV_blocks = [], []
    for cols in _blocks(seqlen_k, tiling.block_n):
        # Load K_j, V_j; initialise dK_j = dV_j = 0.
        K_j = K[..., cols, :].to(acc_dtype)  # (B, Hk, 1, Bc, D)
        V_j = V[..., cols, :].to(acc_dtype)
        dK_j = K_j.new_zeros(K_j.shape)
        dV_j = V_j.new_zeros(V_j.shape)
        for i, rows in enumerate(row_blocks):
            if _causal_skips(causal, rows, cols, seqlen_q, seqlen_k):
                continue  # this query block sees none of these keys
            allowed = _tile_allowed(mask5, causal, rows, cols, seqlen_q, seqlen_k, q.device)
            if allowed is not None and not bool(allowed.any()):
                continue
            # Load Q_i, dO_i, L_i, D_i.
            Q_i = Q[..., rows, :].to(acc_dtype)  # (B, Hk, G, Br, D)
            dO_i = dO[..., rows, :].to(acc_dtype)
            L_i = L[..., rows]  # (B, Hk, G, Br)
            D_i = D[..., rows]
            # S_ij = scale * Q_i K_j^T, masked pairs set to -inf.   (B, Hk, G, Br, Bc)
            S_ij = scale * (Q_i @ K_j.transpose(-1, -2))
            if allowed is not None:
                S_ij = S_ij.masked_fill(~allowed, float("-inf"))
            # P_ij = exp(S_ij - L_i): the forward's probabilities, rebuilt from L alone.
            # Rows with L = +inf (nothing visible) give exp(-inf) = 0, never NaN.
            P_ij = torch.exp(S_ij - L_i.unsqueeze(-1))
            # dV_j += P_ij^T dO_i, summed over the query heads that share this value head.
            dV_j = dV_j + (P_ij.transpose(-1, -2) @ dO_i).sum(dim=2, keepdim=True)
            # dP_ij = dO_i V_j^T.
            dP_ij = dO_i @ V_j.transpose(-1, -2)
            # dS_ij = P_ij * (dP_ij - D_i): the softmax Jacobian applied row by row.
            dS_ij = P_ij * (dP_ij - D_i.unsqueeze(-1))
            # dQ_i += scale * dS_ij K_j.
            dQ_ij = scale * (dS_ij @ K_j)
            dQ_blocks[i] = dQ_ij if dQ_blocks[i] is None else dQ_blocks[i] + dQ_ij
            # dK_j += scale * dS_ij^T Q_i, summed over the group.
            dK_j = dK_j + scale * (dS_ij.transpose(-1, -2) @ Q_i).sum(dim=2, keepdim=True)
        dK_blocks.append(dK_j)
        dV_blocks.append(dV_j)

    # Query blocks that saw no key at all get a zero gradient.
    dQ_blocks = [
        Q.new_zeros(Q[..., rows, :].shape, dtype=acc_dtype) if dQ_i is None else dQ_i
        for rows, dQ_i in zip(row_blocks, dQ_blocks)
    ]
    dq = _merge_heads(torch.cat(dQ_blocks, dim=-2)).to(q.dtype)  # (B, Sq, H, D)
    dk = _merge_heads(torch.cat(dK_blocks, dim=-2)).to(k.dtype)  # (B, Sk, Hk, D)
    dv = _merge_heads(torch.cat(dV_blocks, dim=-2)).to(v.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


class AttentionTiledFunction(torch.autograd.Function):
    """Tiled forward; backward = :func:`attention_tiled_bwd` (not autograd through the loops).

    Saves only q, k, v, out and lse: O(seqlen) memory, where standard attention keeps the
    (seqlen_q, seqlen_k) probabilities. Supports ``torch.func`` transforms (jacrev, vmap)
    through a generated vmap rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, tiling):
        return attention_tiled_fwd(q, k, v, tiling)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.tiling = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        # lse is an auxiliary output: its gradient (if any) is ignored.
        q, k, v, out, lse = ctx.saved_tensors
        return *attention_tiled_bwd(dout, q, k, v, out, lse, ctx.tiling), None


def attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    return_lse: bool = False,
):
    """FlashAttention, tiled, with the paper's backward.

    Args:
        q: (batch, seqlen_q, nheads, headdim), float dtype.
        k, v: (batch, seqlen_k, nheads_k, headdim), q's dtype; nheads % nheads_k == 0.
        softmax_scale, causal, mask, block_m, block_n: see :class:`Tiling`.
        return_lse: also return the log-sum-exp.
    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype; with ``return_lse``, also
        lse (batch, nheads, seqlen_q) (fp32 for fp16/bf16 inputs), +inf for rows that see
        no key (their output is zero).
    """
    tiling = Tiling(softmax_scale, causal, mask, block_m, block_n)
    out, lse = AttentionTiledFunction.apply(q, k, v, tiling)
    return (out, lse) if return_lse else out
