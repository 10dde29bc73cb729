"""``flash_attn.layers.rotary`` of flash-attn 2.x: the same names, arguments and defaults, over
:func:`flash_attn.ops.rotary.apply_rotary` and :class:`flash_attn.modules.rotary.RotaryEmbedding`.

Layouts: ``qkv`` (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, nheads_q + 2 * nheads_k,
headdim) with ``num_heads_q``; ``kv`` (batch, seqlen, 2, nheads_k, headdim).
"""

from __future__ import annotations

import functools

import torch

from flash_attn.modules.rotary import RotaryEmbedding as _RotaryTables
from flash_attn.ops.rotary import apply_rotary


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


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):  # fmt: skip
    """Rotate x (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with
    cu_seqlens, by cos/sin (seqlen_rotary, rotary_dim / 2). Returns x's shape and dtype."""
    return apply_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace)


def _split_qk(qkv: torch.Tensor, num_heads_q: int | None):
    """Views of q and k inside qkv (see the module docstring for the layouts)."""
    if num_heads_q is None:
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(
                f"qkv must be (batch, seqlen, 3, nheads, headdim) without num_heads_q, "
                f"got {tuple(qkv.shape)}"
            )
        return qkv[:, :, 0], qkv[:, :, 1]
    num_heads_k = (qkv.shape[2] - num_heads_q) // 2
    if qkv.dim() != 4 or num_heads_k < 1 or num_heads_q + 2 * num_heads_k != qkv.shape[2]:
        raise ValueError(
            f"qkv must be (batch, seqlen, num_heads_q + 2 * nheads_k, headdim) with "
            f"num_heads_q={num_heads_q}, got {tuple(qkv.shape)}"
        )
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]


class _RotateViewsInplace(torch.autograd.Function):
    """Rotate views of a packed tensor in place (q and k of qkv, k of kv) as one autograd node,
    as flash-attn 2.x does: a leaf that requires grad is overwritten too, and its gradient is
    the upstream gradient with the same views rotated back.

    Takes packed, then views (packed -> the views to rotate), tables (one (cos, sin) per
    view), interleaved and seqlen_offsets; returns packed."""

    @staticmethod
    def forward(ctx, packed, views, tables, interleaved, seqlen_offsets):
        _rotate_views(packed, views, tables, interleaved, seqlen_offsets, conjugate=False)
        # A leaf that requires grad cannot be marked dirty; the returned alias then carries
        # this function's gradient back to it.
        if not (packed.is_leaf and packed.requires_grad):
            ctx.mark_dirty(packed)
        ctx.views, ctx.tables = views, tables
        ctx.interleaved, ctx.seqlen_offsets = interleaved, seqlen_offsets
        return packed

    @staticmethod
    def backward(ctx, dout):
        dpacked = dout.clone()
        _rotate_views(
            dpacked, ctx.views, ctx.tables, ctx.interleaved, ctx.seqlen_offsets, conjugate=True
        )
        return dpacked, None, None, None, None


def _rotate_views(packed, views, tables, interleaved, seqlen_offsets, conjugate):
    for x, (cos, sin) in zip(views(packed), tables):
        # Out of place, then copied: the views are strided inside packed.
        x.copy_(apply_rotary(x, cos, sin, seqlen_offsets, interleaved=interleaved,
                             conjugate=conjugate))  # fmt: skip


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets=0, num_heads_q=None):  # fmt: skip
    """Rotate q and k inside qkv in place (k by cos_k/sin_k when given); returns qkv.
    Differentiable, also for a leaf that requires grad (see the module docstring for layouts)."""
    _split_qk(qkv, num_heads_q)  # checks the layout before anything is written
    tables = ((cos, sin), (cos, sin) if cos_k is None else (cos_k, sin_k))
    views = functools.partial(_split_qk, num_heads_q=num_heads_q)
    return _RotateViewsInplace.apply(qkv, views, tables, interleaved, seqlen_offsets)


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotate k = kv[:, :, 0] in place; returns kv (batch, seqlen, 2, nheads_k, headdim).
    Differentiable, also for a leaf that requires grad."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return _RotateViewsInplace.apply(kv, _k_of_kv, ((cos, sin),), interleaved, seqlen_offsets)


def _k_of_kv(kv: torch.Tensor) -> tuple[torch.Tensor]:
    return (kv[:, :, 0],)


apply_rotary_emb_func = apply_rotary_emb


class RotaryEmbedding(_RotaryTables):
    """flash-attn 2.x's rotary module: forward(qkv, kv=None, seqlen_offset=0, max_seqlen=None,
    num_heads_q=None) rotates q and k of a packed qkv (or q and a packed kv) in place.

    Args:
        dim: rotary_dim (even). base: the RoPE theta. interleaved: GPT-J layout.
        scale_base: XPos: q is scaled by s ** ((pos - L // 2) / scale_base) and k by its
            inverse, s = (2i + 0.4 dim) / (1.4 dim), L = seqlen + seqlen_offset (or max_seqlen)
            of the call. None: plain RoPE.
    """

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__(dim, base, interleaved, device=device)
        self.scale_base = scale_base

    def _tables(self, seqlen: int, device, dtype):
        """(cos_q, sin_q, cos_k, sin_k), each (>= seqlen, dim / 2)."""
        if self.scale_base is None:
            cos, sin = self.cos_sin(seqlen, device, dtype)
            return cos, sin, cos, sin
        cos, sin = (t[:seqlen] for t in self.cos_sin(seqlen, device, torch.float32))
        i = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32)
        positions = torch.arange(seqlen, device=device, dtype=torch.float32)
        power = (positions - seqlen // 2) / self.scale_base
        scale = ((i + 0.4 * self.dim) / (1.4 * self.dim)) ** power[:, None]  # (L, dim / 2)
        # scaled in fp32, rounded once
        return tuple(t.to(dtype) for t in (cos * scale, sin * scale, cos / scale, sin / scale))

    def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
        """qkv: (batch, seqlen, 3, nheads, headdim) (or packed with num_heads_q), or q
        (batch, seqlen, nheads, headdim) when kv (batch, seqlen, 2, nheads_k, headdim) is given.
        seqlen_offset: int or (batch,) int32 tensor; max_seqlen: the table length to build.
        Returns: qkv, or (q, kv), rotated in place."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            needed = max_seqlen
        elif isinstance(seqlen_offset, torch.Tensor):
            needed = seqlen + int(seqlen_offset.max())  # a device sync; pass max_seqlen to avoid
        else:
            needed = seqlen + seqlen_offset
        cos, sin, cos_k, sin_k = self._tables(needed, qkv.device, qkv.dtype)
        if kv is None:
            return apply_rotary_emb_qkv_(
                qkv, cos, sin, cos_k, sin_k, self.interleaved, seqlen_offset, num_heads_q
            )
        q = apply_rotary_emb(qkv, cos, sin, self.interleaved, True, seqlen_offset)
        apply_rotary_emb_kv_(kv, cos_k, sin_k, self.interleaved, seqlen_offset)
        return q, kv
