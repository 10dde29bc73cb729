"""Standard attention in plain PyTorch: the statement of the math and the test oracle.

It materialises the (seqlen_q, seqlen_k) score matrix, so it is for small inputs and for
checking the kernels. Computation happens in the dtype of the inputs: upcast them to fp64
for an oracle, or leave them in fp16 to measure what plain PyTorch loses at that precision.
"""

from __future__ import annotations

import math

import torch
from einops import repeat


def query_key_distance(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """(seqlen_q, seqlen_k) int64: j - (i + seqlen_k - seqlen_q), the signed distance of key j
    from query i's diagonal, which is aligned to the bottom-right corner of the score matrix."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    return j - i - (seqlen_k - seqlen_q)


def window_allowed(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    device=None,
) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j.

    Query i sees keys within ``left`` before and ``right`` after its diagonal
    (-1: unlimited); causal means right = 0. The diagonal is bottom-right aligned: the last
    query sees the last key, and when seqlen_q > seqlen_k the first queries may see nothing.
    """
    distance = query_key_distance(seqlen_q, seqlen_k, device)
    left, right = window_size
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if left >= 0:
        allowed &= distance >= -left
    if causal or right >= 0:
        allowed &= distance <= (0 if causal else right)
    return allowed


def causal_allowed(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) causal mask: query i sees keys j <= i + seqlen_k - seqlen_q."""
    return window_allowed(seqlen_q, seqlen_k, causal=True, device=device)


def nonfinite_to_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values x (batch, seqlen_k, nheads_k, headdim) with their NaN and inf entries
    replaced by 0, and (batch, seqlen_k, nheads_k) bool, True for the vectors that had any.

    A masked key's probability is exactly 0, but 0 * NaN is NaN: zeroed, a key that holds
    garbage (a cache slot never written) contributes nothing to the queries that cannot see
    it, and :func:`rows_seeing` names the queries that can, which get NaN back.
    """
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), ~finite.all(-1)


def rows_seeing(
    bad_keys: torch.Tensor, nheads: int, allowed: torch.Tensor | None = None, seqlen_q: int = 0
) -> torch.Tensor:
    """(batch, nheads, seqlen_q, 1) bool: True for the queries that see one of bad_keys.

    Args:
        bad_keys: (batch, seqlen_k, nheads_k) bool; query head h reads key head
            h // (nheads // nheads_k).
        allowed: bool broadcastable to (batch, nheads, seqlen_q, seqlen_k), True where a query
            sees a key; None for the causal mask of seqlen_q queries, computed in
            O(seqlen_q + seqlen_k) memory (row i sees keys j <= i + seqlen_k - seqlen_q).
    """
    seqlen_k = bad_keys.shape[1]
    if allowed is None:
        seen_so_far = bad_keys.int().cumsum(dim=1) > 0  # (B, Sk, Hk): a bad key at j' <= j
        last = torch.arange(seqlen_q, device=bad_keys.device) + seqlen_k - seqlen_q
        rows = seen_so_far[:, last.clamp(min=0)] & (last >= 0)[None, :, None]  # (B, Sq, Hk)
        return repeat(rows, "b s hk -> b (hk g) s 1", g=nheads // rows.shape[-1])
    # Counting the bad keys each row sees as a product keeps memory at the mask's size.
    bad = repeat(bad_keys, "b s hk -> b (hk g) s 1", g=nheads // bad_keys.shape[-1])
    return allowed.to(torch.float32) @ bad.to(torch.float32) > 0


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """ALiBi as an explicit bias: -slope * |i + seqlen_k - seqlen_q - j|.

    Args:
        alibi_slopes: (nheads,) or (batch, nheads).
    Returns:
        (1 or batch, nheads, seqlen_q, seqlen_k), the slopes' dtype.
    """
    distance = query_key_distance(seqlen_q, seqlen_k, alibi_slopes.device).abs()
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)
    return -slopes[:, :, None, None] * distance.to(alibi_slopes.dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive attention, differentiable by autograd.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 and query head h
            reads key/value head h // (nheads // nheads_k).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal, window_size: bottom-right aligned masks (see :func:`window_allowed`).
        dropout_p: probability of dropping an attention weight.
        dropout_keep: bool (batch, nheads, seqlen_q, seqlen_k), True where a weight is kept.
            Drawn from torch's generator when dropout_p > 0 and it is None.
        softcap: scores become softcap * tanh(scores / softcap) when > 0.
        alibi_slopes: (nheads,) or (batch, nheads), see :func:`alibi_bias`.
        attn_bias: float, broadcastable to (batch, nheads, seqlen_q, seqlen_k), added to the
            scores; or bool of that shape, True where attention is allowed.
    Returns:
        out: (batch, seqlen_q, nheads, headdim), zeros for rows that attend to nothing.
        lse: (batch, nheads, seqlen_q) log-sum-exp of the scores, +inf for such rows.
        probs: (batch, nheads, seqlen_q, seqlen_k) softmax probabilities before dropout.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    # (B, Sk, Hk, D) -> (B, Sk, H, D): each key/value head serves a contiguous group of queries
    k = repeat(k, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    v = repeat(v, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_bias is not None and attn_bias.dtype == torch.bool:
        scores = scores.masked_fill(~attn_bias, float("-inf"))
    elif attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k).to(scores.dtype)
    if causal or tuple(window_size) != (-1, -1):
        allowed = window_allowed(seqlen_q, seqlen_k, causal, window_size, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    # exp(-inf - (+inf)) = 0, so rows with no key get all-zero probabilities instead of NaN.
    lse = lse.masked_fill(empty, float("inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    weights = probs
    if dropout_p > 0.0:
        if dropout_keep is None:
            dropout_keep = torch.rand_like(probs, dtype=torch.float32) >= dropout_p
        weights = probs.masked_fill(~dropout_keep, 0.0) / (1.0 - dropout_p)
    # Masked keys contribute nothing, even NaN or inf values: only the rows that see them do.
    v, bad_values = nonfinite_to_zero(v)
    poisoned = rows_seeing(bad_values, nheads, ~torch.isneginf(scores))  # (B, H, Sq, 1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    out = out.masked_fill(poisoned.transpose(1, 2), float("nan"))  # (B, Sq, H, 1)
    return out, lse, probs
