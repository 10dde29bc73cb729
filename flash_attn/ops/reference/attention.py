"""Standard attention in plain PyTorch: the statement of the math and the test oracle.

It materialises the (seqlen_q, seqlen_k) score matrix, so it is for small inputs and for
checking the kernels. Computation happens in the dtype of the inputs: upcast them to fp64
for an oracle, or leave them in fp16 to measure what plain PyTorch loses at that precision.
"""

from __future__ import annotations

import math

import torch
from einops import repeat


def causal_allowed(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j.

    The diagonal is aligned to the bottom-right corner: query i sees keys
    j <= i + seqlen_k - seqlen_q, so the last query sees every key. When seqlen_q > seqlen_k the
    first seqlen_q - seqlen_k queries see no key at all.
    """
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    return j <= i + (seqlen_k - seqlen_q)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive attention, differentiable by autograd.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 and query head h
            reads key/value head h // (nheads // nheads_k).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: bottom-right aligned causal mask (see :func:`causal_allowed`).
        dropout_p: probability of dropping an attention weight.
        dropout_keep: bool (batch, nheads, seqlen_q, seqlen_k), True where a weight is kept.
            Drawn from torch's generator when dropout_p > 0 and it is None.
    Returns:
        out: (batch, seqlen_q, nheads, headdim), zeros for rows that attend to nothing.
        lse: (batch, nheads, seqlen_q) log-sum-exp of the scaled scores, +inf for such rows.
        probs: (batch, nheads, seqlen_q, seqlen_k) softmax probabilities before dropout.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(headdim)
    # (B, Sk, Hk, D) -> (B, Sk, H, D): each key/value head serves a contiguous group of queries
    k = repeat(k, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    v = repeat(v, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        allowed = causal_allowed(seqlen_q, seqlen_k, q.device)
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
