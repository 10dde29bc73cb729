"""Rotary position embedding in plain PyTorch: the statement of the math and the test oracle.

A token at position p has each pair (x0, x1) of its first rotary_dim features rotated by the
angle p * inv_freq[i], read from the tables cos[p, i] and sin[p, i]:

    out0 = x0 * cos - x1 * sin
    out1 = x0 * sin + x1 * cos

Pairs are (i, i + rotary_dim / 2) in the GPT-NeoX layout and (2i, 2i + 1) in the GPT-J
(interleaved) layout; features past rotary_dim pass through. ``conjugate`` rotates by -angle,
which is the inverse rotation and so also the backward. Computation is in fp32 (fp64 for fp64
inputs) and the result is returned in x's dtype.
"""

from __future__ import annotations

import torch


def rotary_positions(
    x: torch.Tensor,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position of every token: (batch, seqlen) for x (batch, seqlen, ...), (total,) for varlen."""
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        pos = torch.arange(seqlen, device=x.device).expand(batch, seqlen)
        if isinstance(seqlen_offsets, torch.Tensor):
            return pos + seqlen_offsets.to(x.device, torch.long)[:, None]
        return pos + seqlen_offsets
    # Varlen: token t belongs to the sequence b with cu_seqlens[b] <= t < cu_seqlens[b + 1].
    cu_seqlens = cu_seqlens.to(x.device, torch.long)
    tokens = torch.arange(x.shape[0], device=x.device)
    seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    pos = tokens - cu_seqlens[seq]
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(x.device, torch.long)[seq]
    return pos + seqlen_offsets


def apply_rotary_ref(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
) -> torch.Tensor:
    """Rotary embedding, differentiable by autograd (same arguments as ``apply_rotary``).

    Args:
        x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens.
        cos, sin: (seqlen_rotary, rotary_dim / 2), rotary_dim <= headdim; every position
            (token index + offset) must be < seqlen_rotary.
        seqlen_offsets: int, or (batch,) integer tensor: position of each sequence's first token.
        cu_seqlens: (batch + 1,) cumulative sequence lengths, or None. max_seqlen is unused here.
        interleaved: GPT-J pairs (2i, 2i + 1) instead of GPT-NeoX halves.
        inplace: write the result into x and return x.
        conjugate: rotate by -angle.
    Returns:
        x's shape and dtype.
    """
    rotary_dim = 2 * cos.shape[-1]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    pos = rotary_positions(x, seqlen_offsets, cu_seqlens)
    # (..., rotary_dim / 2) -> (..., 1, rotary_dim / 2): one angle per token, shared by heads
    c = cos.to(compute_dtype)[pos].unsqueeze(-2)
    s = sin.to(compute_dtype)[pos].unsqueeze(-2)
    if conjugate:
        s = -s
    rot = x[..., :rotary_dim].to(compute_dtype)
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
    else:
        x0, x1 = rot.chunk(2, dim=-1)
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    # Interleaved: (..., rotary_dim / 2, 2) -> (..., rotary_dim), pairs side by side
    rot = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), -1)
    out = torch.cat((rot.to(x.dtype), x[..., rotary_dim:]), dim=-1)
    return x.copy_(out) if inplace else out


# flash-attn 2.x's plain-PyTorch rotary (``flash_attn.layers.rotary`` re-exports it).


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(x0, x1) -> (-x1, x0) for every rotated pair: halves (GPT-NeoX) or neighbours (GPT-J)."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)  # (..., d / 2, 2) -> (..., d)


def apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    """Plain-PyTorch rotary: x (batch, seqlen, nheads, headdim); cos, sin (seqlen, rotary_dim / 2)
    or (batch, seqlen, rotary_dim / 2). Returns x's shape, computed in x's dtype."""
    rotary_dim = cos.shape[-1] * 2
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} exceeds headdim {x.shape[-1]}")
    # (..., d / 2) -> (..., 1, d): one angle per pair, broadcast over heads
    if interleaved:
        cos, sin = (t.repeat_interleave(2, dim=-1).unsqueeze(-2) for t in (cos, sin))
    else:
        cos, sin = (torch.cat((t, t), dim=-1).unsqueeze(-2) for t in (cos, sin))
    rotated = x[..., :rotary_dim] * cos + rotate_half(x[..., :rotary_dim], interleaved) * sin
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
