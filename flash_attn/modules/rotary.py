"""Rotary position embedding module with the RoPE scalings of Hugging Face models.

``scaling`` takes a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict:

- ``{"rope_type": "linear", "factor": f}``: positions divided by f (inv_freq / f).
- ``{"rope_type": "dynamic", "factor": f}``: dynamic NTK. Past ``max_position_embeddings``
  positions, the base grows to base * (f * L / max_pos - (f - 1)) ** (dim / (dim - 2)) for a
  cache of length L.
- ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"}``: Llama 3.1 frequency-dependent scaling.

The older key ``"type"`` is accepted for ``"rope_type"``. No state is saved in the state dict
(inv_freq is a non-persistent buffer), like recent Hugging Face checkpoints.

``RotaryEmbedding2x`` is flash-attn 2.x's module (packed qkv rotated in place, XPos);
``flash_attn.layers.rotary`` re-exports it as ``RotaryEmbedding``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flash_attn.ops.rotary import (
    apply_rotary,
    apply_rotary_emb,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _default_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    """(dim / 2,) fp32: base ** (-2i / dim), computed as Hugging Face does (same rounding)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Long wavelengths (> old_context / low_freq_factor) slowed by factor, short ones
    (< old_context / high_freq_factor) kept, those between interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, interpolated, out)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions; cos/sin tables are cached and grown on demand.

    Args:
        dim: rotary_dim, the number of features rotated per head (even, <= headdim).
        base: the RoPE theta.
        interleaved: GPT-J layout (pairs 2i, 2i + 1) instead of GPT-NeoX (halves).
        scaling: None, or a Hugging Face rope scaling dict (see the module docstring).
        max_position_embeddings: the trained context length that dynamic NTK scales beyond
            (default: scaling's ``original_max_position_embeddings``).
        backend: passed to :func:`flash_attn.ops.rotary.apply_rotary`.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scaling: dict | None = None,
        max_position_embeddings: int | None = None,
        backend: str | None = None,
        device=None,
    ):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {dim}")
        scaling = dict(scaling or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {_ROPE_TYPES}, got {rope_type!r}")
        if rope_type != "default" and "factor" not in scaling:
            raise ValueError(f"rope_type {rope_type!r} needs a 'factor'")
        if rope_type == "dynamic":
            max_position_embeddings = max_position_embeddings or scaling.get(
                "original_max_position_embeddings"
            )
            if not max_position_embeddings:
                raise ValueError("dynamic scaling needs max_position_embeddings")
        self.dim, self.base, self.interleaved = dim, float(base), interleaved
        self.rope_type, self.scaling = rope_type, scaling
        self.max_position_embeddings, self.backend = max_position_embeddings, backend
        self.register_buffer("inv_freq", self._inv_freq(0, device), persistent=False)
        self._seqlen_cached = 0
        self._cos_cached = self._sin_cached = None

    def _inv_freq(self, seqlen: int, device=None) -> torch.Tensor:
        """(dim / 2,) fp32 frequencies for a cache of seqlen positions."""
        base = self.base
        if self.rope_type == "dynamic" and seqlen > self.max_position_embeddings:
            factor = self.scaling["factor"]
            base = base * (factor * seqlen / self.max_position_embeddings - (factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
        inv_freq = _default_inv_freq(self.dim, base, device)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def _update_cos_sin_cache(self, seqlen: int, device, dtype) -> None:
        stale = (
            self._cos_cached is None
            or self._cos_cached.device != device
            or self._cos_cached.dtype != dtype
        )
        if self.rope_type == "dynamic":
            # The frequencies depend on the cache length: rebuild at the exact length, and fall
            # back to the unscaled table once sequences fit the trained context again.
            max_pos = self.max_position_embeddings
            needed = seqlen > self._seqlen_cached or (seqlen <= max_pos < self._seqlen_cached)
            length = max(seqlen, max_pos) if needed else self._seqlen_cached
        else:
            needed = seqlen > self._seqlen_cached
            # Round up so that decoding one token at a time rebuilds the table rarely.
            length = max(seqlen, 2 * self._seqlen_cached) if needed else self._seqlen_cached
        if not (needed or stale):
            return
        inv_freq = (
            self.inv_freq.to(device)
            if self.rope_type != "dynamic"
            else self._inv_freq(length, device)
        )
        # Positions in fp32, as Hugging Face computes them.
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())  # (length, dim / 2)
        self._cos_cached = torch.cos(freqs).to(dtype)
        self._sin_cached = torch.sin(freqs).to(dtype)
        self._seqlen_cached = length

    def cos_sin(self, seqlen: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables covering positions 0 .. seqlen - 1 (at least), for apply_rotary or
        flash_attn_with_kvcache.

        Returns:
            cos, sin: (>= seqlen, rotary_dim / 2) in dtype on device.
        """
        self._update_cos_sin_cache(seqlen, device, dtype)
        return self._cos_cached, self._sin_cached

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        seqlen_offset: int | torch.Tensor = 0,
        max_seqlen: int | None = None,
    ):
        """Rotate q and k.

        Args:
            q: (batch, seqlen, nheads, headdim); k: (batch, seqlen, nheads_k, headdim) or None.
            seqlen_offset: position of the first token: an int, or a (batch,) int32 tensor
                (KV-cache decoding); with a tensor, max_seqlen bounds seqlen + offsets
                (computed with a device sync when omitted).
        Returns:
            (q_rot, k_rot), same shapes and dtypes (k_rot is None when k is).
        """
        seqlen = q.shape[1]
        if isinstance(seqlen_offset, torch.Tensor):
            needed = max_seqlen if max_seqlen is not None else seqlen + int(seqlen_offset.max())
        else:
            needed = seqlen + seqlen_offset
        cos, sin = self.cos_sin(needed, q.device, q.dtype)
        q = apply_rotary(
            q, cos, sin, seqlen_offset, interleaved=self.interleaved, backend=self.backend
        )
        if k is not None:
            k = apply_rotary(
                k, cos, sin, seqlen_offset, interleaved=self.interleaved, backend=self.backend
            )
        return q, k

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, "
            f"rope_type={self.rope_type!r}"
        )


class RotaryEmbedding2x(RotaryEmbedding):
    """flash-attn 2.x's rotary module (``flash_attn.layers.rotary.RotaryEmbedding``):
    forward(qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None) rotates q and k
    of a packed qkv (or q and a packed kv) in place.

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
