"""A decoding step's cache update in one launch: the new keys and values written into the KV
cache, and each batch entry's key range for the attention that follows.

Without it a step costs a handful of small PyTorch kernels before the attention (the positions,
two scattered writes, the new lengths, the stacked ranges); on a GPU a decoding step is bound by
launches, not by these copies.

Program (b, t) copies token t of batch entry b's new keys and values (all heads) to position
cache_seqlens[b] + t of its cache row (cache_batch_idx[b], or b), or of its pages through the
block table; program (b, 0) also writes key_ranges[b] = (cache_leftpad[b] or 0,
cache_seqlens[b] + seqlen_new).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_attn.ops.launch import LaunchPlan, device_guard, next_power_of_2


@triton.jit
def _append_kernel(
    K,  # (B, S_new, H, D) new keys; V likewise; read when S_NEW > 0
    V,
    KCache,  # (rows, capacity, H, D), or pages (num_pages, page_size, H, D); VCache likewise
    VCache,
    Seqlens,  # (B,) int32: where each entry's new tokens start
    Rows,  # (B,) int32 cache row of each entry; read when HAS_ROWS
    BlockTable,  # (B, max_pages) int32; read when PAGED
    Leftpad,  # (B,) int32; read when HAS_LEFTPAD
    KeyRanges,  # (B, 2) int32 out: [first, end) keys of each entry
    stride_k,  # (batch, token, head) strides of K; stride_v, stride_kc, stride_vc likewise
    stride_v,
    stride_kc,
    stride_vc,
    stride_table_b,
    page_size,
    S_NEW: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    start = tl.load(Seqlens + b)
    if t == 0:
        first = start * 0
        if HAS_LEFTPAD:
            first = tl.load(Leftpad + b)
        tl.store(KeyRanges + 2 * b, first)
        tl.store(KeyRanges + 2 * b + 1, start + S_NEW)
    if S_NEW > 0:
        position = start + t
        if PAGED:
            row = tl.load(BlockTable + b.to(tl.int64) * stride_table_b + position // page_size)
            slot = position % page_size
        else:
            row = b
            if HAS_ROWS:
                row = tl.load(Rows + b)
            slot = position
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < H) & (dims < D)
        src = b.to(tl.int64) * stride_k[0] + t * stride_k[1] + heads * stride_k[2] + dims
        dst = row.to(tl.int64) * stride_kc[0] + slot * stride_kc[1] + heads * stride_kc[2] + dims
        tl.store(KCache + dst, tl.load(K + src, mask=mask), mask=mask)
        src = b.to(tl.int64) * stride_v[0] + t * stride_v[1] + heads * stride_v[2] + dims
        dst = row.to(tl.int64) * stride_vc[0] + slot * stride_vc[1] + heads * stride_vc[2] + dims
        tl.store(VCache + dst, tl.load(V + src, mask=mask), mask=mask)


class CacheAppend:
    """The cache update of one decoding call signature, built from its first call's tensors
    (their metadata only).

    Args (construction): k, v: (batch, seqlen_new, nheads_k, headdim) new keys and values, unit
        stride along headdim, or None (nothing appended: only the key ranges are written);
        k_cache, v_cache: the caches as ``flash_attn_with_kvcache`` takes them (unit stride
        along headdim); batch: the batch size; has_rows: the calls pass cache_batch_idx;
        block_table: the block table of a paged cache (its strides are read), or None;
        has_leftpad: the calls pass cache_leftpad.
    Call (k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, pad):
        cache_seqlens, cache_batch_idx, pad (cache_leftpad): (batch,) int32, contiguous; the
        others as at construction; None where absent.
        Writes k and v into the caches in place and returns key_ranges (batch, 2) int32.
    """

    def __init__(self, k, v, k_cache, v_cache, *, batch, has_rows, block_table, has_leftpad):
        self.batch, self.device = batch, k_cache.device
        seqlen_new = k.shape[1] if k is not None else 0
        nheads, headdim = k_cache.shape[2], k_cache.shape[3]
        none = (0, 0, 0)
        self.launch = LaunchPlan(
            _append_kernel,
            (batch, max(seqlen_new, 1)),
            ("K", "V", "KCache", "VCache", "Seqlens", "Rows", "BlockTable", "Leftpad", "KeyRanges"),
            stride_k=tuple(k.stride()[:3]) if k is not None else none,
            stride_v=tuple(v.stride()[:3]) if v is not None else none,
            stride_kc=tuple(k_cache.stride()[:3]),
            stride_vc=tuple(v_cache.stride()[:3]),
            stride_table_b=block_table.stride(0) if block_table is not None else 0,
            page_size=k_cache.shape[1],
            S_NEW=seqlen_new,
            H=nheads,
            D=headdim,
            HAS_ROWS=has_rows,
            PAGED=block_table is not None,
            HAS_LEFTPAD=has_leftpad,
            BLOCK_H=next_power_of_2(nheads),
            BLOCK_D=next_power_of_2(headdim),
            num_warps=4 if nheads * headdim >= 2048 else 1,
        )

    def __call__(self, k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, pad):
        key_ranges = torch.empty((self.batch, 2), dtype=torch.int32, device=self.device)
        with device_guard(k_cache):
            self.launch(
                k if k is not None else k_cache,
                v if v is not None else v_cache,
                k_cache,
                v_cache,
                cache_seqlens,
                cache_batch_idx if cache_batch_idx is not None else cache_seqlens,
                block_table if block_table is not None else cache_seqlens,
                pad if pad is not None else cache_seqlens,
                key_ranges,
            )
        return key_ranges
