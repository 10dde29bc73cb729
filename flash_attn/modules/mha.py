"""Multi-head attention module over the FlashAttention functions.

Self-attention projects q, k and v with one packed matmul (``Wqkv``, outputs ordered
[q heads, k heads, v heads], also for GQA); cross-attention uses ``Wq`` on x and ``Wkv`` on x_kv,
as the official flash-attn ``MHA`` does. Inputs come in three layouts:

- dense: x (batch, seqlen, embed_dim);
- padded: dense plus ``key_padding_mask`` (batch, seqlen), true for real tokens; the padding is
  removed before the projections, the varlen kernel runs on the packed tokens, and the output is
  padded back with zeros;
- varlen: x (total_tokens, embed_dim) with ``cu_seqlens`` and ``max_seqlen``.

Decoding with a KV cache passes an :class:`flash_attn.models.generation.InferenceParams`; the new
keys and values are appended to the layer's cache and attended to in one
``flash_attn_with_kvcache`` call (rotary applied at the cache positions inside that call).
Rotary positions restart at 0 at the first real token of every sequence (right padding).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from flash_attn.bert_padding import pad_input, unpad_input
from flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flash_attn.modules.rotary import RotaryEmbedding
from flash_attn.ops.attention.checks import window_pair
from flash_attn.ops.rotary import apply_rotary
from flash_attn.utils.checks import check_backend, check_bool, check_float, check_int


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) fp32 ALiBi slopes: the geometric series of the ALiBi paper, with the
    interleaving for head counts that are not powers of two."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


_FLAGS = ("cross_attn", "qkv_proj_bias", "out_proj_bias", "causal", "rotary_emb_interleaved")
_FLAGS += ("use_alibi",)
# MHA argument -> check(name, value): the kind and range each argument must have.
_ARGUMENT_CHECKS = {
    **dict.fromkeys(("embed_dim", "num_heads"), partial(check_int, minimum=1)),
    "num_heads_kv": partial(check_int, minimum=1, optional=True),
    **dict.fromkeys(_FLAGS, check_bool),
    "dropout": partial(check_float, low=0.0, high=1.0, high_open=True),
    "softmax_scale": partial(check_float, low=0.0, low_open=True, optional=True),
    "layer_idx": partial(check_int, minimum=0, optional=True),
    "rotary_emb_dim": partial(check_int, minimum=0),
    "rotary_emb_base": partial(check_float, low=0.0, low_open=True),
    "rotary_max_position_embeddings": partial(check_int, minimum=1, optional=True),
    "window_size": lambda name, value: window_pair(value),
    **dict.fromkeys(("backend", "rotary_backend"), check_backend),
}


def _check_arguments(arguments: dict) -> None:
    """TypeError/ValueError naming the first MHA argument of the wrong kind or range."""
    for name, check in _ARGUMENT_CHECKS.items():
        check(name, arguments[name])
    if arguments["rotary_emb_dim"] % 2:
        raise ValueError(f"rotary_emb_dim must be even, got {arguments['rotary_emb_dim']}")


class MHA(nn.Module):
    """Multi-head (and multi-query / grouped-query) attention.

    Args:
        embed_dim: model width; num_heads divides it (head_dim = embed_dim // num_heads).
        num_heads: query heads. num_heads_kv: key/value heads (default num_heads), dividing
            num_heads (GQA / MQA).
        cross_attn: attend x to x_kv (separate ``Wq`` and ``Wkv`` projections).
        qkv_proj_bias, out_proj_bias: biases of the input and output projections.
        dropout: attention-probability dropout in training mode.
        softmax_scale: default 1 / sqrt(head_dim).
        causal: causal mask (self-attention).
        layer_idx: key of this layer's cache in ``InferenceParams.key_value_memory_dict``.
        rotary_emb_dim: features per head rotated by RoPE (0: no rotary).
        rotary_emb_base, rotary_emb_interleaved, rotary_emb_scaling: see
            :class:`flash_attn.modules.rotary.RotaryEmbedding`.
        use_alibi: ALiBi biases with the standard slopes.
        window_size: (left, right) sliding window, -1 for unlimited.
        backend: attention and rotary backend (None/"auto", "triton", "torch").
        rotary_max_position_embeddings: trained context (dynamic NTK scaling only).
        rotary_backend: rotary backend when it differs (default: backend).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        cross_attn: bool = False,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        rotary_emb_scaling: dict | None = None,
        use_alibi: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        backend: str | None = None,
        rotary_max_position_embeddings: int | None = None,
        rotary_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_arguments(locals())
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if num_heads_kv < 1 or num_heads % num_heads_kv:
            raise ValueError(
                f"num_heads_kv must divide num_heads ({num_heads}), got {num_heads_kv}"
            )
        if cross_attn and rotary_emb_dim > 0:
            raise ValueError("rotary_emb_dim > 0 is only supported for self-attention")
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        if rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim must be <= head_dim ({self.head_dim})")
        self.cross_attn, self.causal, self.dropout = cross_attn, causal, dropout
        self.softmax_scale, self.layer_idx = softmax_scale, layer_idx
        self.window_size, self.backend = window_pair(window_size), backend
        factory = dict(device=device, dtype=dtype)
        kv_dim = 2 * num_heads_kv * self.head_dim
        if cross_attn:
            self.Wq = nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory)
        else:
            self.Wqkv = nn.Linear(embed_dim, embed_dim + kv_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb = None
        if rotary_emb_dim > 0:
            self.rotary_emb = RotaryEmbedding(
                rotary_emb_dim,
                base=rotary_emb_base,
                interleaved=rotary_emb_interleaved,
                scaling=rotary_emb_scaling,
                max_position_embeddings=rotary_max_position_embeddings,
                backend=rotary_backend if rotary_backend is not None else backend,
                device=device,
            )
        if use_alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, device=None):
        """Empty (k_cache, v_cache), each (batch_size, max_seqlen, num_heads_kv, head_dim)."""
        weight = self.Wkv.weight if self.cross_attn else self.Wqkv.weight
        dtype = dtype or weight.dtype
        shape = (batch_size, max_seqlen, self.num_heads_kv, self.head_dim)
        k_cache = torch.empty(shape, dtype=dtype, device=device or weight.device)
        return k_cache, torch.empty_like(k_cache)

    def _check_input(self, x, x_kv, key_padding_mask, cu_seqlens, max_seqlen, inference_params):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must end with embed_dim={self.embed_dim}, got shape {tuple(x.shape)}"
            )
        if cu_seqlens is not None:
            if x.dim() != 2 or max_seqlen is None:
                raise ValueError(
                    "with cu_seqlens, x must be (total_tokens, embed_dim) and max_seqlen given, "
                    f"got x {tuple(x.shape)}, max_seqlen={max_seqlen}"
                )
            if key_padding_mask is not None or inference_params is not None:
                raise ValueError("cu_seqlens cannot be combined with key_padding_mask or a cache")
        elif x.dim() != 3:
            raise ValueError(f"x must be (batch, seqlen, embed_dim), got {tuple(x.shape)}")
        if self.cross_attn != (x_kv is not None):
            raise ValueError(
                "x_kv must be given for cross-attention and only then "
                f"(cross_attn={self.cross_attn})"
            )
        if key_padding_mask is not None:
            if inference_params is not None:
                raise ValueError("key_padding_mask cannot be combined with inference_params")
            seq_source = x_kv if x_kv is not None else x
            if key_padding_mask.shape != seq_source.shape[:2]:
                raise ValueError(
                    f"key_padding_mask must be (batch, seqlen_k) = {tuple(seq_source.shape[:2])},"
                    f" got {tuple(key_padding_mask.shape)}"
                )

    def forward(
        self,
        x: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        inference_params=None,
    ) -> torch.Tensor:
        """Attention output projected back to embed_dim.

        Args:
            x: (batch, seqlen, embed_dim), or (total_tokens, embed_dim) with cu_seqlens.
            x_kv: (batch, seqlen_k, embed_dim), cross-attention only.
            key_padding_mask: (batch, seqlen_k) bool, true for real tokens. For
                self-attention it masks the queries too (their outputs are zeros).
            cu_seqlens: (batch + 1,) int32 for varlen x; max_seqlen: the longest sequence.
            inference_params: :class:`~flash_attn.models.generation.InferenceParams` for
                KV-cache decoding (self-attention, dense x).
        Returns:
            x's shape and dtype.
        """
        self._check_input(x, x_kv, key_padding_mask, cu_seqlens, max_seqlen, inference_params)
        dropout_p = self.dropout if self.training else 0.0
        attn_kwargs = dict(
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
            alibi_slopes=self.alibi_slopes,
        )
        if self.cross_attn:
            return self._cross_attention(x, x_kv, key_padding_mask, dropout_p, attn_kwargs)
        if inference_params is not None:
            return self._decode(x, inference_params)

        batch, seqlen = x.shape[:2]
        indices = None
        if key_padding_mask is not None:
            # (B, S, E) -> (total_tokens, E): no projection work on padding.
            x, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, key_padding_mask)
        q, k, v = self._project_qkv(x)
        if cu_seqlens is not None:
            q, k = self._rotate(q, k, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            out = flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens,
                cu_seqlens,
                max_seqlen,
                max_seqlen,
                dropout_p,
                **attn_kwargs,
                backend=self.backend,
            )
        else:
            q, k = self._rotate(q, k)
            out = flash_attn_func(q, k, v, dropout_p, **attn_kwargs, backend=self.backend)
        out = self.out_proj(out.flatten(-2))  # (..., H, D) -> (..., H * D) -> (..., E)
        if indices is not None:
            out = pad_input(out, indices, batch, seqlen)  # (total_tokens, E) -> (B, S, E)
        return out

    def _project_qkv(self, x):
        """x (..., E) -> q (..., H, D), k and v (..., H_kv, D)."""
        qkv = self.Wqkv(x)  # (..., E) -> (..., (H + 2 * H_kv) * D)
        heads = qkv.unflatten(-1, (-1, self.head_dim))  # -> (..., H + 2 * H_kv, D)
        return heads.split([self.num_heads, self.num_heads_kv, self.num_heads_kv], dim=-2)

    def _rotate(self, q, k, cu_seqlens=None, max_seqlen=None):
        if self.rotary_emb is None:
            return q, k
        if cu_seqlens is None:
            return self.rotary_emb(q, k)
        rotary = self.rotary_emb
        cos, sin = rotary.cos_sin(max_seqlen, q.device, q.dtype)
        kwargs = dict(
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            interleaved=rotary.interleaved,
            backend=rotary.backend,
        )
        q = apply_rotary(q, cos, sin, **kwargs)
        k = apply_rotary(k, cos, sin, **kwargs)
        return q, k

    def _rotate_cached(self, q, k, cos, sin, offset: int):
        """Rotate this step's q and k (B, S, H, D) at cache positions offset, offset + 1, ...;
        without a causal or local mask every query sits at offset (as in flash_attn_with_kvcache).
        """
        kwargs = dict(interleaved=self.rotary_emb.interleaved, backend=self.rotary_emb.backend)
        k = apply_rotary(k, cos, sin, offset, **kwargs)
        if self.causal or self.window_size != (-1, -1):
            return apply_rotary(q, cos, sin, offset, **kwargs), k
        batch, seqlen, nheads, headdim = q.shape
        q = q.reshape(batch, 1, seqlen * nheads, headdim)  # (B, S, H, D) -> (B, 1, S * H, D)
        return apply_rotary(q, cos, sin, offset, **kwargs).view(batch, seqlen, nheads, headdim), k

    def _cross_attention(self, x, x_kv, key_padding_mask, dropout_p, attn_kwargs):
        batch, seqlen_q = x.shape[:2]
        q = self.Wq(x).unflatten(-1, (self.num_heads, self.head_dim))  # (B, Sq, E) -> (B, Sq, H, D)
        kv = self.Wkv(x_kv)  # (B, Sk, E) -> (B, Sk, 2 * H_kv * D)
        k, v = kv.unflatten(-1, (2, self.num_heads_kv, self.head_dim)).unbind(
            -3
        )  # (B, Sk, H_kv, D)
        if key_padding_mask is None:
            out = flash_attn_func(q, k, v, dropout_p, **attn_kwargs, backend=self.backend)
        else:
            # Keys packed per sequence; every query kept: cu_seqlens_q steps by seqlen_q.
            # (B, Sk, H_kv, D) -> (total_k, H_kv, D)
            k, indices, cu_seqlens_k, max_seqlen_k, _ = unpad_input(k, key_padding_mask)
            v = v.flatten(0, 1)[indices]
            cu_seqlens_q = torch.arange(
                0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device
            )
            out = flash_attn_varlen_func(
                q.flatten(0, 1),
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                seqlen_q,
                max_seqlen_k,
                dropout_p,
                **attn_kwargs,
                backend=self.backend,
            ).unflatten(0, (batch, seqlen_q))  # (B * Sq, H, D) -> (B, Sq, H, D)
        return self.out_proj(out.flatten(-2))  # (B, Sq, H, D) -> (B, Sq, E)

    def _decode(self, x, inference_params):
        """Append this step's keys/values to the cache and attend to everything cached."""
        if self.layer_idx is None:
            raise ValueError("MHA needs a layer_idx to use inference_params")
        batch, seqlen = x.shape[:2]
        caches = inference_params.key_value_memory_dict
        if self.layer_idx not in caches:
            caches[self.layer_idx] = self.allocate_inference_cache(
                inference_params.max_batch_size,
                inference_params.max_seqlen,
                dtype=x.dtype,
                device=x.device,
            )
        k_cache, v_cache = caches[self.layer_idx]
        offset = inference_params.seqlen_offset
        if offset + seqlen > k_cache.shape[1]:
            raise ValueError(
                f"cache holds {k_cache.shape[1]} positions; {offset} used + {seqlen} new exceed it"
            )
        start = inference_params.batch_size_offset
        k_cache, v_cache = k_cache[start : start + batch], v_cache[start : start + batch]
        q, k, v = self._project_qkv(x)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb.cos_sin(inference_params.max_seqlen, x.device, x.dtype)
            q, k = self._rotate_cached(q, k, cos, sin, offset)
        out = flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens=offset,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            window_size=self.window_size,
            alibi_slopes=self.alibi_slopes,
            backend=self.backend,
        )
        return self.out_proj(out.flatten(-2))  # (B, S, H, D) -> (B, S, E)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_heads_kv={self.num_heads_kv}, causal={self.causal}, cross_attn={self.cross_attn}"
        )
