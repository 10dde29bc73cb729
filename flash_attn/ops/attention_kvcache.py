"""Attention over a KV cache for decoding: append the new keys/values, rotate, attend.

``flash_attn_with_kvcache`` (the official API, re-exported by ``flash_attn``) is defined here.
Inference only (no autograd). The Triton path reads each batch entry's cache in place (its
length from cache_seqlens, its row from cache_batch_idx, or its pages from block_table) and,
when there are too few query blocks to fill the GPU, splits the cache across programs
(split-KV) and merges the partial softmaxes. The torch path attends each batch entry's valid
prefix with the dense backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flash_attn.ops.attention_checks import check_attention_inputs
from flash_attn.ops.attention_options import AttentionOptions
from flash_attn.ops.attention_torch import attention_torch_dense
from flash_attn.ops.backend import resolve_backend


@dataclass(frozen=True)
class CacheLayout:
    """Where key j of batch entry b lives: k_cache[rows[b], j], or, in a paged cache,
    k_cache[block_table[b, j // page_size], j % page_size]."""

    rows: Tensor  # (batch,) int64
    block_table: Tensor | None  # (batch, max_pages) int32
    page_size: int
    capacity: int  # keys per batch entry

    def index(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cache row, slot) index tensors for positions (batch, n) of each batch entry."""
        if self.block_table is None:
            return self.rows[:, None], positions
        pages = self.block_table.long().gather(1, positions // self.page_size)
        return pages, positions % self.page_size

    def keys(self, cache: Tensor, b: int, length: int) -> Tensor:
        """The first length keys of batch entry b: (1, length, nheads_k, headdim)."""
        if self.block_table is None:
            return cache[self.rows[b], :length][None]
        positions = torch.arange(length, device=cache.device)
        pages = self.block_table[b].long()[positions // self.page_size]
        return cache[pages, positions % self.page_size][None]


def _cache_layout(q, k_cache, cache_batch_idx, block_table) -> CacheLayout:
    batch = q.shape[0]
    expected = (
        ("cache_batch_idx", cache_batch_idx, 1, f"({batch},)"),
        ("block_table", block_table, 2, f"({batch}, max_pages)"),
    )
    for name, t, rank, shape in expected:
        if t is not None and not (
            isinstance(t, Tensor)
            and t.dtype == torch.int32
            and t.dim() == rank
            and t.shape[0] == batch
        ):
            raise ValueError(f"{name} must be an int32 tensor of shape {shape}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("pass cache_batch_idx or block_table, not both")
        return CacheLayout(
            torch.arange(batch, device=q.device),
            block_table,
            k_cache.shape[1],
            block_table.shape[1] * k_cache.shape[1],
        )
    if cache_batch_idx is None and k_cache.shape[0] != batch:
        raise ValueError(
            f"k_cache must have batch {batch} like q (or pass cache_batch_idx), got "
            f"{k_cache.shape[0]}"
        )
    rows = (
        cache_batch_idx.long()
        if cache_batch_idx is not None
        else torch.arange(batch, device=q.device)
    )
    return CacheLayout(rows, None, k_cache.shape[1], k_cache.shape[1])


def _check_cache_inputs(q, k_cache, k, v, cache_seqlens, layout: CacheLayout):
    batch, seqlen_new = q.shape[0], 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    if k is not None:
        check_attention_inputs(q, k, v, 0.0, None)
        if k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(
                f"k must have (nheads_k, headdim) = {tuple(k_cache.shape[2:])} like "
                f"k_cache, got {tuple(k.shape[2:])}"
            )
        seqlen_new = k.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    elif cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k and v to the cache")
        cache_seqlens = torch.full((batch,), layout.capacity, dtype=torch.int32, device=q.device)
    elif not (
        isinstance(cache_seqlens, Tensor)
        and cache_seqlens.shape == (batch,)
        and cache_seqlens.dtype == torch.int32
    ):
        raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape ({batch},)")
    if not torch.compiler.is_compiling():  # data-dependent checks would break the graph
        rows = layout.rows if layout.block_table is None else layout.block_table
        if ((rows < 0) | (rows >= k_cache.shape[0])).any():
            name = "cache_batch_idx" if layout.block_table is None else "block_table"
            raise ValueError(f"{name} values must be in [0, {k_cache.shape[0]})")
        if (cache_seqlens < 0).any():
            raise ValueError("cache_seqlens must be >= 0")
        longest = int((cache_seqlens + seqlen_new).max().item())
        if longest > layout.capacity:
            raise ValueError(
                f"the cache is too short: cache_seqlens + {seqlen_new} new tokens "
                f"reach {longest} > the cache's {layout.capacity} positions"
            )
    return cache_seqlens.to(q.device)


def _rotate(q, k, rotary_cos, rotary_sin, cache_seqlens, causal_or_local, interleaved, backend):
    from flash_attn.ops.rotary import apply_rotary

    if k is not None:
        k = apply_rotary(
            k, rotary_cos, rotary_sin, cache_seqlens, interleaved=interleaved, backend=backend
        )
    if causal_or_local:
        # The new queries sit at positions cache_seqlens, cache_seqlens + 1, ...
        q = apply_rotary(
            q, rotary_cos, rotary_sin, cache_seqlens, interleaved=interleaved, backend=backend
        )
    else:
        # Without a mask every new query is placed at position cache_seqlens.
        batch, seqlen_q, nheads, headdim = q.shape
        q = apply_rotary(
            q.reshape(batch, 1, seqlen_q * nheads, headdim),
            rotary_cos,
            rotary_sin,
            cache_seqlens,
            interleaved=interleaved,
            backend=backend,
        ).view(q.shape)
    return q, k


def _auto_num_splits(q, seqlen_k: int, nheads: int) -> int:
    """Enough splits to give every SM about two programs, each with >= 256 keys."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    programs = q.shape[0] * nheads * math.ceil(q.shape[1] / 64)
    if programs >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / programs), math.ceil(seqlen_k / 256), 64))


@torch.no_grad()
def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: str | None = None,
):
    """Decoding step: append k, v to the cache in place, then attend q to the cache.

    Args:
        q: (batch, seqlen_q, nheads, headdim), the new queries.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), updated in place; or,
            with block_table, a paged cache (num_pages, page_size, nheads_k, headdim).
        k, v: (batch, seqlen_new, nheads_k, headdim) or None: written at positions
            cache_seqlens[b], cache_seqlens[b] + 1, ... of cache row cache_batch_idx[b] (or b).
        rotary_cos, rotary_sin: (seqlen_rotary, rotary_dim / 2) or None: k is rotated at its
            cache positions; q too when causal or local, else all of q at cache_seqlens.
        cache_seqlens: int or (batch,) int32, the tokens already in each cache row. None means
            the whole cache (only without k and v).
        cache_batch_idx: (batch,) int32, which cache row each batch entry uses.
        block_table: (batch, max_pages) int32: page p of batch entry b's sequence is
            k_cache[block_table[b, p]] (a paged cache, as in vLLM); excludes cache_batch_idx.
        cache_leftpad: not supported (NotImplementedError when given).
        num_splits: split-KV programs per query block; 0 picks from the GPU's SM count.
        return_softmax_lse: also return the (batch, nheads, seqlen_q) fp32 log-sum-exp.
        others: see ``flash_attn.flash_attn_interface``. Causal is aligned to the end of each
            cache row.
    Returns:
        out (batch, seqlen_q, nheads, headdim), and softmax_lse when asked for.
    """
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad is not supported; pass None")
    check_attention_inputs(
        q,
        k_cache,
        v_cache,
        0.0,
        softmax_scale,
        window_size,
        softcap,
        alibi_slopes,
        same_batch=False,
    )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    layout = _cache_layout(q, k_cache, cache_batch_idx, block_table)
    cache_seqlens = _check_cache_inputs(q, k_cache, k, v, cache_seqlens, layout)
    if rotary_cos is not None:
        local = causal or tuple(window_size) != (-1, -1)
        q, k = _rotate(
            q, k, rotary_cos, rotary_sin, cache_seqlens, local, rotary_interleaved, backend
        )
    if k is not None:
        # Append in place: entry b's new tokens go to positions cache_seqlens[b] + 0, 1, ...
        positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=q.device)
        index = layout.index(positions)
        k_cache[index] = k
        v_cache[index] = v
        seqlens_k = cache_seqlens + k.shape[1]
    else:
        seqlens_k = cache_seqlens
    opts = AttentionOptions.create(q.shape[-1], softmax_scale, causal, window_size, softcap)
    out, lse = _attend_to_cache(q, k_cache, v_cache, seqlens_k, layout, cache_batch_idx, opts,
                                alibi_slopes, num_splits, return_softmax_lse, backend)  # fmt: skip
    return (out, lse) if return_softmax_lse else out


def _attend_to_cache(q, k_cache, v_cache, seqlens_k, layout, cache_batch_idx, opts, alibi_slopes,
                     num_splits, return_lse, backend):  # fmt: skip
    """(out, lse) of q attending to the first seqlens_k[b] keys of each batch entry's cache. The
    torch path computes lse only when return_lse (it then materialises the scores of each batch
    entry); the Triton path always has it."""
    if resolve_backend(backend, q.device) == "triton":
        from flash_attn.ops.triton.attention import attention_fwd

        splits = num_splits or _auto_num_splits(q, layout.capacity, q.shape[2])
        return attention_fwd(
            q,
            k_cache,
            v_cache,
            opts,
            num_splits=splits,
            alibi_slopes=alibi_slopes,
            seqlens_k=seqlens_k.to(torch.int32),
            k_batch_idx=cache_batch_idx,
            block_table=layout.block_table,
            max_seqlen_k=layout.capacity,
        )
    outs, lses = [], []
    for b, length in enumerate(seqlens_k.tolist()):
        slopes = (
            alibi_slopes[b]
            if alibi_slopes is not None and alibi_slopes.dim() == 2
            else alibi_slopes
        )
        out, lse, _ = attention_torch_dense(
            q[b : b + 1],
            layout.keys(k_cache, b, length),
            layout.keys(v_cache, b, length),
            opts,
            None,
            slopes,
            return_probs=return_lse,
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses) if return_lse else None
