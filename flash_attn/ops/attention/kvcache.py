"""Attention over a KV cache for decoding: append the new keys/values, rotate, attend.

``flash_attn_with_kvcache`` (the official API, re-exported by ``flash_attn``) is defined here.
Inference only (no autograd). The Triton path reads each batch entry's cache in place (its
keys from cache_leftpad to cache_seqlens, its row from cache_batch_idx, or its pages from
block_table) and, when there are too few query blocks to fill the GPU, splits the cache across
programs (split-KV) and merges the partial softmaxes. The torch path attends each batch
entry's valid keys with the dense backend. Slots outside them are never read, so a cache
allocated with torch.empty is fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flash_attn.ops.attention.checks import (
    check_attention_inputs,
    check_block_table,
    check_flag,
    window_pair,
)
from flash_attn.ops.attention.function import attention_compiled
from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.torch_backend import attention_torch_dense
from flash_attn.ops.backend import reads_values, resolve_backend
from flash_attn.ops.plans import PlanCache, call_signature


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

    def keys(self, cache: Tensor, b: int, start: int, end: int) -> Tensor:
        """Keys start to end of batch entry b: (1, end - start, nheads_k, headdim)."""
        if self.block_table is None:
            return cache[self.rows[b], start:end][None]
        positions = torch.arange(start, end, device=cache.device)
        pages = self.block_table[b].long()[positions // self.page_size]
        return cache[pages, positions % self.page_size][None]


@dataclass(frozen=True)
class CacheKeys:
    """The keys that batch entry b attends to: positions [leftpad[b], ends[b]) of its cache."""

    layout: CacheLayout
    leftpad: Tensor | None  # (batch,) int32, None for 0
    ends: Tensor  # (batch,) int32


def gather_pages(cache: Tensor, block_table: Tensor, cu_seqlens_k: Tensor) -> Tensor:
    """The keys (or values) of every sequence of a paged cache, one sequence after another.

    Args:
        cache: (num_pages, page_size, nheads_k, headdim).
        block_table: (batch, max_pages) int32, the pages of each sequence in order.
        cu_seqlens_k: (batch + 1,) int32; sequence b has cu_seqlens_k[b + 1] - cu_seqlens_k[b]
            keys, from position 0 of its pages.
    Returns:
        (total_k, nheads_k, headdim), differentiable with respect to cache.
    """
    lengths = cu_seqlens_k.diff()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=cache.device), lengths)
    positions = torch.arange(sequence.numel(), device=cache.device) - cu_seqlens_k[sequence]
    pages = block_table.long()[sequence, positions // cache.shape[1]]
    return cache[pages, positions % cache.shape[1]]


def _check_layout(q, k_cache, cache_batch_idx, block_table) -> None:
    """cache_batch_idx and block_table: int32, one row per batch entry, not both; without
    either, k_cache has q's batch."""
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
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("pass cache_batch_idx or block_table, not both")
    if block_table is None and cache_batch_idx is None and k_cache.shape[0] != batch:
        raise ValueError(
            f"k_cache must have batch {batch} like q (or pass cache_batch_idx), got "
            f"{k_cache.shape[0]}"
        )


def _check_cache_inputs(q, k_cache, k, v, cache_seqlens, cache_leftpad, block_table) -> None:
    """k and v (given together, shaped like the cache's heads), cache_seqlens (an int, an int32
    (batch,) tensor, or None without k and v) and cache_leftpad, as far as their metadata
    tells."""
    batch = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values), or neither")
    if k is not None:
        check_attention_inputs(q, k, v, 0.0, None)
        if k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(
                f"k must have (nheads_k, headdim) = {tuple(k_cache.shape[2:])} like "
                f"k_cache, got {tuple(k.shape[2:])}"
            )
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k and v to the cache")
    elif not isinstance(cache_seqlens, int) and not (
        isinstance(cache_seqlens, Tensor)
        and cache_seqlens.shape == (batch,)
        and cache_seqlens.dtype == torch.int32
    ):
        raise ValueError(f"cache_seqlens must be an int or an int32 tensor of shape ({batch},)")
    _check_leftpad(cache_leftpad, q, block_table)


def _check_cache_values(k_cache, seqlen_new, cache_seqlens, cache_leftpad, layout) -> None:
    """The values of cache_seqlens, cache_leftpad and the cache rows or pages (read only where
    reading them does not synchronise with a GPU)."""
    if (cache_seqlens < 0).any():
        raise ValueError("cache_seqlens must be >= 0")
    if cache_leftpad is not None and ((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).any():
        raise ValueError(
            f"cache_leftpad must be in [0, cache_seqlens] for each batch entry, got "
            f"{cache_leftpad.tolist()} with cache_seqlens {cache_seqlens.tolist()}"
        )
    if layout.block_table is not None:
        check_block_table(
            layout.block_table, k_cache, cache_seqlens + seqlen_new, cache_seqlens.shape[0]
        )
        return
    _check_cache_rows(layout.rows, k_cache.shape[0], appending=seqlen_new > 0)
    longest = int((cache_seqlens + seqlen_new).max().item())
    if longest > layout.capacity:
        raise ValueError(
            f"the cache is too short: cache_seqlens + {seqlen_new} new tokens "
            f"reach {longest} > the cache's {layout.capacity} positions"
        )


def _check_leftpad(cache_leftpad, q: Tensor, block_table) -> None:
    if cache_leftpad is None:
        return
    batch = q.shape[0]
    if not (
        isinstance(cache_leftpad, Tensor)
        and cache_leftpad.dtype == torch.int32
        and cache_leftpad.shape == (batch,)
    ):
        raise ValueError(f"cache_leftpad must be an int32 tensor of shape ({batch},)")
    if cache_leftpad.device != q.device:
        raise ValueError(f"cache_leftpad is on {cache_leftpad.device} but q is on {q.device}")
    if block_table is not None:
        raise ValueError("pass cache_leftpad or block_table, not both (as the official package)")


def _check_cache_rows(rows: Tensor, batch_cache: int, appending: bool) -> None:
    """The cache rows of the batch entries (cache_batch_idx) exist, and no two entries append
    to the same row (one of their writes would be lost)."""
    if ((rows < 0) | (rows >= batch_cache)).any():
        raise ValueError(f"cache_batch_idx values must be in [0, {batch_cache})")
    if appending and rows.unique().numel() != rows.numel():
        raise ValueError(
            "cache_batch_idx must not repeat a cache row when k and v are appended (each batch "
            f"entry writes its own row), got {rows.tolist()}"
        )


def _rotate(q, k, rotary_cos, rotary_sin, positions, causal_or_local, interleaved, backend):
    """q and k rotated: k's first new token (and q's) sits at positions[b] of sequence b."""
    from flash_attn.ops.rotary import apply_rotary

    if k is not None:
        k = apply_rotary(
            k, rotary_cos, rotary_sin, positions, interleaved=interleaved, backend=backend
        )
    if causal_or_local:
        # The new queries sit at positions[b], positions[b] + 1, ...
        q = apply_rotary(
            q, rotary_cos, rotary_sin, positions, interleaved=interleaved, backend=backend
        )
    else:
        # Without a mask every new query is placed at position positions[b].
        batch, seqlen_q, nheads, headdim = q.shape
        q = apply_rotary(
            q.reshape(batch, 1, seqlen_q * nheads, headdim),
            rotary_cos,
            rotary_sin,
            positions,
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
            cache positions cache_seqlens[b], cache_seqlens[b] + 1, ... (also with
            cache_leftpad, as the official kernel); q too when causal or local, else all of q
            at the position of the first new token.
        cache_seqlens: int or (batch,) int32, where each cache row's tokens end (the new ones
            are written from there). None means the whole cache (only without k and v).
        cache_batch_idx: (batch,) int32, which cache row each batch entry uses; no row twice
            when k and v are appended.
        cache_leftpad: (batch,) int32 or None, where each cache row's tokens start: the slots
            before it are padding, never attended.
            Excludes block_table (as in the official package).
        block_table: (batch, max_pages) int32: page p of batch entry b's sequence is
            k_cache[block_table[b, p]] (a paged cache, as in vLLM); excludes cache_batch_idx.
            A RuntimeError names it when the sequences outgrow their pages.
        num_splits: split-KV programs per query block; 0 picks from the GPU's SM count.
        return_softmax_lse: also return the (batch, nheads, seqlen_q) fp32 log-sum-exp.
        others: see ``flash_attn.flash_attn_interface``. Causal is aligned to the end of each
            cache row. Slots outside [cache_leftpad, cache_seqlens + seqlen_new) may hold
            anything (torch.empty garbage, NaN): they contribute nothing.
    Returns:
        out (batch, seqlen_q, nheads, headdim), and softmax_lse when asked for.
    """
    tensors = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad)
    tensors += (block_table, alibi_slopes)
    seqlens_tensor = cache_seqlens if isinstance(cache_seqlens, Tensor) else None
    options = (cache_seqlens if seqlens_tensor is None else None, softmax_scale, causal)
    options += (window_size, softcap, rotary_interleaved, num_splits, backend)
    key = call_signature((*tensors, seqlens_tensor), options)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.keep(key, _DecodePlan(*tensors, cache_seqlens, *options[1:]))
    layout = CacheLayout(
        cache_batch_idx.long() if cache_batch_idx is not None else plan.rows,
        block_table,
        plan.page_size,
        plan.capacity,
    )
    cache_seqlens = plan.seqlens if seqlens_tensor is None else seqlens_tensor.to(q.device)
    if reads_values(q):  # reading the values would synchronise with a GPU
        seqlen_new = k.shape[1] if k is not None else 0
        _check_cache_values(k_cache, seqlen_new, cache_seqlens, cache_leftpad, layout)
    if rotary_cos is not None:
        # At the cache slots, also after a cache_leftpad, as the official kernel: scores depend
        # on distances only, so the padding changes nothing but the angles stored in the cache.
        q, k = _rotate(
            q, k, rotary_cos, rotary_sin, cache_seqlens, plan.local, rotary_interleaved, backend
        )
    if plan.backend == "triton" and not torch.compiler.is_compiling():
        # One launch appends k and v and writes the key ranges, one attends.
        key_ranges = plan.cache_append(k, v, k_cache, v_cache, cache_batch_idx, block_table)(
            k,
            v,
            k_cache,
            v_cache,
            cache_seqlens.contiguous(),
            cache_batch_idx.contiguous() if cache_batch_idx is not None else None,
            block_table,
            cache_leftpad.contiguous() if cache_leftpad is not None else None,
        )
        launch = plan.forward_launch(
            q, k_cache, v_cache, alibi_slopes, cache_batch_idx, block_table
        )
        out, lse = launch(
            q,
            k_cache,
            v_cache,
            alibi_slopes=alibi_slopes,
            key_ranges=key_ranges,
            k_batch_idx=cache_batch_idx,
            block_table=block_table,
        )
        return (out, lse) if return_softmax_lse else out
    if k is not None:
        # Append in place: entry b's new tokens go to positions cache_seqlens[b] + 0, 1, ...
        index = layout.index(cache_seqlens.long()[:, None] + plan.new_positions)
        k_cache[index] = k
        v_cache[index] = v
        seqlens_k = cache_seqlens + k.shape[1]
    else:
        seqlens_k = cache_seqlens
    keys = CacheKeys(layout, cache_leftpad, seqlens_k)
    out, lse = _attend_to_cache(
        plan, q, k_cache, v_cache, keys, cache_batch_idx, alibi_slopes, return_softmax_lse
    )
    return (out, lse) if return_softmax_lse else out


_plans = PlanCache(max_plans=256)  # per call signature of flash_attn_with_kvcache


class _DecodePlan:
    """What one call signature of :func:`flash_attn_with_kvcache` resolved to, checked on its
    first call (the arguments in the function's order, cache_seqlens after the tensors): the
    options, the backend, the cache's geometry, the index tensors every call of the signature
    shares and, for Triton, the forward launch (built on first use)."""

    def __init__(
        self,
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_batch_idx,
        cache_leftpad,
        block_table,
        alibi_slopes,
        cache_seqlens,
        softmax_scale,
        causal,
        window_size,
        softcap,
        rotary_interleaved,
        num_splits,
        backend,
    ):
        window_size = window_pair(window_size)
        causal = check_flag("causal", causal)
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
        _check_layout(q, k_cache, cache_batch_idx, block_table)
        _check_cache_inputs(q, k_cache, k, v, cache_seqlens, cache_leftpad, block_table)
        batch, device = q.shape[0], q.device
        self.opts = AttentionOptions.create(
            q.shape[-1], softmax_scale, causal, window_size, softcap
        )
        self.local = causal or window_size != (-1, -1)
        self.backend = resolve_backend(backend, device, q.dtype)
        self.num_splits = num_splits
        self.page_size = k_cache.shape[1]
        paged = block_table is not None
        self.capacity = block_table.shape[1] * self.page_size if paged else self.page_size
        self.rows = torch.arange(batch, device=device)  # cache row b, without cache_batch_idx
        self.seqlens = None  # (batch,) int32 for an int cache_seqlens (None: the whole cache)
        if not isinstance(cache_seqlens, Tensor):
            filled = self.capacity if cache_seqlens is None else cache_seqlens
            self.seqlens = torch.full((batch,), filled, dtype=torch.int32, device=device)
        self.new_positions = torch.arange(k.shape[1], device=device) if k is not None else None
        self.has_leftpad = cache_leftpad is not None
        self.append = self.launch = None

    def cache_append(self, k, v, k_cache, v_cache, cache_batch_idx, block_table):
        """The Triton cache update of the signature (append and key ranges), built on first
        use."""
        if self.append is None:
            from flash_attn.ops.attention.triton.cache import CacheAppend

            self.append = CacheAppend(
                k,
                v,
                k_cache,
                v_cache,
                batch=self.rows.shape[0],
                has_rows=cache_batch_idx is not None,
                block_table=block_table,
                has_leftpad=self.has_leftpad,
            )
        return self.append

    def forward_launch(self, q, k_cache, v_cache, alibi_slopes, cache_batch_idx, block_table):
        """The Triton forward launch of the signature, built on first use."""
        if self.launch is None:
            from flash_attn.ops.attention.triton.forward import ForwardLaunch

            self.launch = ForwardLaunch(
                q,
                k_cache,
                v_cache,
                self.opts,
                batch=q.shape[0],
                alibi_slopes=alibi_slopes,
                max_seqlen_k=self.capacity,
                key_ranges=True,
                num_splits=self.num_splits or _auto_num_splits(q, self.capacity, q.shape[2]),
                kv_batch_idx=cache_batch_idx is not None,
                block_table=block_table,
            )
        return self.launch


def _attend_to_cache(
    plan: _DecodePlan,
    q,
    k_cache,
    v_cache,
    keys: CacheKeys,
    cache_batch_idx,
    alibi_slopes,
    return_lse,
):
    """(out, lse) of q attending to each batch entry's keys in the cache, on the torch backend
    or, under ``torch.compile``, through the op it traces (eager Triton calls take
    :class:`~flash_attn.ops.attention.triton.cache.CacheAppend` and the plan's forward launch).
    The torch path computes lse only when return_lse (it then materialises the scores of each
    batch entry)."""
    layout, opts = keys.layout, plan.opts
    if plan.backend == "triton":
        from flash_attn.ops.attention.triton.forward import key_ranges_of

        out, lse, _ = attention_compiled(
            q,
            k_cache,
            v_cache,
            opts,
            alibi_slopes=alibi_slopes,
            max_seqlen_k=layout.capacity,
            key_ranges=key_ranges_of(keys.ends.to(torch.int32), keys.leftpad),
            k_batch_idx=cache_batch_idx,
            block_table=layout.block_table,
            num_splits=plan.num_splits or _auto_num_splits(q, layout.capacity, q.shape[2]),
        )
        return out, lse
    starts = keys.leftpad.tolist() if keys.leftpad is not None else [0] * q.shape[0]
    outs, lses = [], []
    for b, (start, end) in enumerate(zip(starts, keys.ends.tolist())):
        slopes = (
            alibi_slopes[b]
            if alibi_slopes is not None and alibi_slopes.dim() == 2
            else alibi_slopes
        )
        out, lse, _ = attention_torch_dense(
            q[b : b + 1],
            layout.keys(k_cache, b, start, end),
            layout.keys(v_cache, b, start, end),
            opts,
            None,
            slopes,
            return_probs=return_lse,
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses) if return_lse else None
