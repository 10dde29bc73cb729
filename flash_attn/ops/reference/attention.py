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
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    return out, lse, probs
