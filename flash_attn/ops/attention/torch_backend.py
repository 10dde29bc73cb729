"""The torch backend of attention: plain differentiable PyTorch, on any device.

``F.scaled_dot_product_attention`` where it covers the case (its fused CPU and GPU kernels
keep memory linear in the sequence length when there is no mask), the naive reference where it
does not (softcap, returned probabilities). A sliding window is computed one query chunk at a
time against only the keys that chunk can see, so its cost grows with the window, not the
sequence.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import repeat

from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.reference import (
    alibi_bias,
    attention_ref,
    nonfinite_to_zero,
    rows_seeing,
    window_allowed,
)


def attention_torch_dense(q, k, v, opts: AttentionOptions, bias, alibi_slopes, return_probs):
    """Dense (batch, seqlen, nheads, headdim) attention in PyTorch.

    Returns (out, lse, probs) as ``flash_attn.ops.attention.attention``; lse and probs are None
    unless return_probs (then the scores are materialised in fp32).
    """
    kwargs = dict(
        window_size=opts.window_size,
        softcap=opts.softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=bias,
    )
    if return_probs or opts.softcap > 0.0:
        # Half-precision math on CPU is emulated anyway: compute in fp32, return in q's dtype.
        compute = torch.float32 if q.dtype != torch.float64 else q.dtype
        keep = None
        if opts.dropout_p > 0.0:
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            keep = torch.rand(shape, device=q.device) >= opts.dropout_p
        out, lse, probs = attention_ref(
            q.to(compute),
            k.to(compute),
            v.to(compute),
            opts.softmax_scale,
            opts.causal,
            opts.dropout_p,
            keep,
            **kwargs,
        )
        if keep is not None:
            probs = torch.where(keep, probs, -probs)
        return out.to(q.dtype), lse.float(), probs.to(q.dtype)

    seqlen_q, nheads, seqlen_k, nheads_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    mask = _sdpa_mask(q, seqlen_q, seqlen_k, opts, bias, alibi_slopes)
    poisoned = None
    if (mask is not None or opts.causal) and _may_hold_nonfinite(k, v):
        # A masked key must contribute nothing even if it holds NaN or inf (garbage in a cache
        # slot): SDPA would add -inf to a NaN score and multiply a NaN value by 0.
        k, bad_keys = nonfinite_to_zero(k)
        v, bad_values = nonfinite_to_zero(v)
        allowed = None if mask is None else _allowed(mask)
        poisoned = rows_seeing(bad_keys | bad_values, nheads, allowed, seqlen_q)
    if nheads != nheads_k:
        # (B, Sk, Hk, D) -> (B, Sk, H, D)
        k = repeat(k, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
        v = repeat(v, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    empty_rows = None
    if mask is not None:
        # Rows that see no key attend to everything here and are zeroed below, so they are
        # zeros with finite gradients in every torch version.
        empty_rows = ~_allowed(mask).any(dim=-1, keepdim=True)  # (..., Sq, 1)
        mask = mask.masked_fill(empty_rows, 0.0 if mask.dtype != torch.bool else True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # (B, S, H, D) -> (B, H, S, D)
        attn_mask=mask,
        dropout_p=opts.dropout_p,
        scale=opts.softmax_scale,
        is_causal=opts.causal and mask is None,
    )  # (B, H, Sq, D)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    if poisoned is not None:
        out = out.masked_fill(poisoned, float("nan"))
    return out.transpose(1, 2).contiguous(), None, None  # (B, H, Sq, D) -> (B, Sq, H, D)


def _may_hold_nonfinite(k, v) -> bool:
    """False when k and v are surely finite, so the exact NaN guard can be skipped.

    On CPU one sum of each decides (a NaN or inf makes it non-finite; an overflow of finite
    values only costs the guard). Elsewhere, and while torch.compile traces, True: reading the
    answer would synchronise the device or branch on data inside the graph.
    """
    if k.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    total = k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)
    return not bool(torch.isfinite(total))


def _allowed(mask):
    """True where an SDPA attn_mask (bool, or additive float) lets a query see a key."""
    return mask if mask.dtype == torch.bool else ~torch.isneginf(mask)


def _sdpa_mask(q, seqlen_q, seqlen_k, opts, bias, alibi_slopes):
    """SDPA's attn_mask for what is_causal cannot say: None, bool (Sq, Sk) or additive float."""
    plain_causal = opts.causal and seqlen_q == seqlen_k and opts.window_size == (-1, -1)
    mask = None
    if (opts.causal and not plain_causal) or opts.window_size != (-1, -1):
        mask = window_allowed(seqlen_q, seqlen_k, opts.causal, opts.window_size, q.device)
    elif plain_causal and (bias is not None or alibi_slopes is not None):
        mask = window_allowed(seqlen_q, seqlen_k, True, device=q.device)
    if bias is None and alibi_slopes is None:
        return mask
    additive = torch.zeros((), dtype=q.dtype, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        mask = bias if mask is None else mask & bias
    elif bias is not None:
        additive = additive + bias.to(q.dtype)
    if alibi_slopes is not None:
        additive = additive + alibi_bias(alibi_slopes, seqlen_q, seqlen_k).to(q.dtype)
    if mask is not None:
        additive = additive.masked_fill(~mask, float("-inf"))
    return additive.expand(*additive.shape[:-2], seqlen_q, seqlen_k)


QUERY_CHUNK = 256


def attention_torch_banded(q, k, v, opts: AttentionOptions, bias, alibi_slopes):
    """Sliding-window attention, QUERY_CHUNK queries at a time against only the keys they can
    see; the window, ALiBi and bias of each chunk become one additive mask."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    diag = seqlen_k - seqlen_q
    left, right = opts.window_size
    right = 0 if opts.causal else (seqlen_k if right < 0 else right)
    unmasked = replace(opts, causal=False, window_left=-1, window_right=-1)
    outs = []
    for i0 in range(0, seqlen_q, QUERY_CHUNK):
        i1 = min(i0 + QUERY_CHUNK, seqlen_q)
        j0 = min(max(i0 + diag - left, 0), seqlen_k)
        j1 = max(min(i1 + diag + right, seqlen_k), j0)
        if j0 == j1:
            outs.append(torch.zeros_like(q[:, i0:i1]))
            continue
        rows = torch.arange(i0, i1, device=q.device)[:, None]
        cols = torch.arange(j0, j1, device=q.device)[None, :]
        distance = cols - rows - diag
        allowed = (distance >= -left) & (distance <= right)
        chunk_bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, float("-inf")
        )  # (chunk, keys)
        if bias is not None and bias.dtype == torch.bool:
            chunk_bias = chunk_bias.masked_fill(~bias[..., i0:i1, j0:j1], float("-inf"))
        elif bias is not None:
            chunk_bias = chunk_bias + bias[..., i0:i1, j0:j1].to(q.dtype)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
            chunk_bias = chunk_bias - slopes[:, :, None, None] * distance.abs().to(slopes.dtype)
        out, _, _ = attention_torch_dense(
            q[:, i0:i1], k[:, j0:j1], v[:, j0:j1], unmasked, chunk_bias.to(q.dtype), None, False
        )
        outs.append(out)
    return torch.cat(outs, dim=1)


def attention_torch(q, k, v, opts: AttentionOptions, bias, alibi_slopes, varlen, return_probs):
    """The torch backend of ``flash_attn.ops.attention.attention`` (same arguments, after
    checks; bias already expanded to (batch, nheads, seqlen_q, seqlen_k))."""
    if varlen is None:
        if opts.window_size[0] >= 0 and q.shape[1] > QUERY_CHUNK and not return_probs:
            return attention_torch_banded(q, k, v, opts, bias, alibi_slopes), None, None
        return attention_torch_dense(q, k, v, opts, bias, alibi_slopes, return_probs)
    # Packed sequences: each is attended alone, so no work is spent on padding.
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses, probs = [], [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b] : starts_q[b + 1]].unsqueeze(0)  # (Sq_b, H, D) -> (1, Sq_b, H, D)
        k_b = k[starts_k[b] : starts_k[b + 1]].unsqueeze(0)
        v_b = v[starts_k[b] : starts_k[b + 1]].unsqueeze(0)
        sq, sk = q_b.shape[1], k_b.shape[1]
        bias_b = None
        if bias is not None:
            bias_b = bias[b : b + 1, :, :sq, :sk]
        slopes_b = (
            alibi_slopes[b]
            if alibi_slopes is not None and alibi_slopes.dim() == 2
            else (alibi_slopes)
        )
        out_b, lse_b, probs_b = attention_torch_dense(
            q_b, k_b, v_b, opts, bias_b, slopes_b, return_probs
        )
        outs.append(out_b[0])
        if return_probs:
            lses.append(lse_b[0])  # (H, Sq_b)
            probs.append(F.pad(probs_b, (0, max_seqlen_k - sk, 0, max_seqlen_q - sq)))
    out = torch.cat(outs)
    if not return_probs:
        return out, None, None
    return out, torch.cat(lses, dim=1), torch.cat(probs)
