"""Input checks of the attention API: a TypeError or ValueError that names the argument."""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

MAX_HEADDIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, t, q: Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must match")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}: they must match")
    if min(t.shape) == 0:
        raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got stride "
            f"{t.stride(-1)}; call .contiguous() first"
        )


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_flag(name: str, value) -> bool:
    """value as a bool; TypeError naming the argument unless it is a bool or the int 0 or 1 (a
    string such as "no" would otherwise count as True)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def window_pair(window_size) -> tuple[int, int]:
    """window_size as two Python ints; TypeError or ValueError naming window_size unless it is a
    pair of integers >= -1: a tuple or list of two ints or 0-d integer tensors, or a 1-D integer
    tensor of two (as the official functions accept, since they index it)."""
    if isinstance(window_size, Tensor) and window_size.dim() == 1:
        window_size = window_size.tolist()  # floats or bools are refused below
    if not isinstance(window_size, (tuple, list)):
        raise TypeError(
            f"window_size must be a pair (left, right) of integers >= -1, got {window_size!r}"
        )
    if len(window_size) != 2:
        raise ValueError(f"window_size must be two integers >= -1, got {window_size!r}")
    try:
        pair = tuple(operator.index(w) for w in window_size if not isinstance(w, bool))
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise TypeError(f"window_size must be two integers >= -1, got {window_size!r}")
    if min(pair) < -1:
        raise ValueError(f"window_size must be two integers >= -1, got {window_size!r}")
    return pair


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float | None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
    varlen: tuple | None = None,
    same_batch: bool = True,
    paged: bool = False,
) -> None:
    """Raise TypeError/ValueError naming the argument when q, k, v cannot be attended.

    Expected: q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim)
    (without the batch dimension for varlen), one floating dtype among fp16/bf16/fp32, one
    device, unit stride in the last dimension, nheads % nheads_k == 0, 1 <= headdim <= 256,
    0 <= dropout_p < 1, window values >= -1, softcap >= 0, alibi_slopes fp32 (nheads,) or
    (batch, nheads), attn_bias float or bool and broadcastable to (batch, nheads, seqlen_q,
    seqlen_k). same_batch=False lets k and v have another batch size (a KV cache indexed by
    cache_batch_idx); paged=True makes k and v paged caches (num_pages, page_size, nheads_k,
    headdim) beside a varlen q.
    """
    rank, layout = (
        (3, "(total_tokens, nheads, headdim)")
        if varlen
        else (4, "(batch, seqlen, nheads, headdim)")
    )
    _check_tensor("q", q, q, rank, layout)
    if paged:
        rank, layout = 4, "(num_pages, page_size, nheads_k, headdim) with block_table"
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, q, rank, layout)
    nheads, headdim = q.shape[-2], q.shape[-1]
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    batch = varlen[0].numel() - 1 if varlen else q.shape[0]
    if not varlen and same_batch and k.shape[0] != batch:
        raise ValueError(f"k and v must have batch {batch} like q, got {k.shape[0]}")
    if k.shape[-1] != headdim:
        raise ValueError(f"k and v must have headdim {headdim} like q, got {k.shape[-1]}")
    if headdim > MAX_HEADDIM:
        raise ValueError(f"headdim must be at most {MAX_HEADDIM}, got {headdim}")
    if nheads % k.shape[-2] != 0:
        raise ValueError(
            f"nheads of q ({nheads}) must be divisible by nheads of k and v ({k.shape[-2]})"
        )
    if not _is_number(dropout_p):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    window_pair(window_size)
    if softmax_scale is not None and not (
        _is_number(softmax_scale) and math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    if not (_is_number(softcap) and math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap!r}")
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(
                f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got "
                f"{tuple(alibi_slopes.shape)}"
            )
        if alibi_slopes.device != q.device or alibi_slopes.stride(-1) != 1:
            raise ValueError("alibi_slopes must be on q's device with a unit last stride")
    if attn_bias is not None:
        _check_bias(attn_bias, q, k, batch, varlen)


def _check_bias(attn_bias, q, k, batch, varlen) -> None:
    if not isinstance(attn_bias, Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor, got {type(attn_bias).__name__}")
    if not (attn_bias.is_floating_point() or attn_bias.dtype == torch.bool):
        raise TypeError(f"attn_bias must be a float tensor or a bool mask, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    if varlen:
        target = (batch, q.shape[-2], varlen[2], varlen[3])
    else:
        target = (batch, q.shape[2], q.shape[1], k.shape[1])
    try:
        fits = torch.broadcast_shapes(attn_bias.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits or attn_bias.dim() > 4:
        raise ValueError(
            f"attn_bias must broadcast to (batch, nheads, seqlen_q, seqlen_k) = {target}, got "
            f"shape {tuple(attn_bias.shape)}"
        )


def check_varlen_inputs(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=None
):
    """Check packed-sequence offsets; return (cu_seqlens_q, cu_seqlens_k, max_q, max_k).

    Expected: cu_seqlens_* int32 (batch + 1,) on q's device, starting at 0, non-decreasing,
    ending at the token count of q (resp. k); max_seqlen_* ints at least the longest sequence.
    With block_table, k and v are paged caches: see :func:`check_block_table`.
    """
    packed = (("q", q),) if block_table is not None else (("q", q), ("k", k), ("v", v))
    for name, t in packed:
        if isinstance(t, Tensor) and t.dim() != 3:
            raise ValueError(
                f"{name} must have 3 dimensions (total_tokens, nheads, headdim), "
                f"got shape {tuple(t.shape)}"
            )
    for name, cu, tokens in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        if not isinstance(cu, Tensor):
            raise TypeError(
                f"{name} must be an int32 tensor of shape (batch + 1,), got {type(cu).__name__}"
            )
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"{name} must be int32 of shape (batch + 1,), got {cu.dtype} of "
                f"shape {tuple(cu.shape)}"
            )
        if isinstance(tokens, Tensor) and cu.device != tokens.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {tokens.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
            f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    maxima = []
    for name, cu, tokens, max_name, given in (
        ("cu_seqlens_q", cu_seqlens_q, q, "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k, "max_seqlen_k", max_seqlen_k),
    ):
        if not isinstance(given, int) or given < 1:
            raise ValueError(f"{max_name} must be a positive int, got {given!r}")
        if torch.compiler.is_compiling():
            maxima.append(given)  # data-dependent checks would break the graph
            continue
        lengths = cu[1:] - cu[:-1]
        if cu[0].item() != 0 or (lengths < 0).any().item():
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {cu.tolist()}")
        if block_table is not None and name == "cu_seqlens_k":
            check_block_table(block_table, k, lengths, cu.numel() - 1)
        elif isinstance(tokens, Tensor) and tokens.dim() >= 1 and cu[-1].item() != tokens.shape[0]:
            raise ValueError(
                f"{name} must end at the number of tokens ({tokens.shape[0]}), got {cu[-1].item()}"
            )
        longest = int(lengths.max().item())
        if given < longest:
            raise ValueError(
                f"{max_name} ({given}) is smaller than the longest sequence in {name} ({longest})"
            )
        maxima.append(given)
    return cu_seqlens_q, cu_seqlens_k, maxima[0], maxima[1]


def check_block_table(block_table, k_cache, lengths: Tensor | None, batch: int) -> int:
    """Check a page table and return its capacity (positions per sequence).

    Expected: block_table int32 (batch, max_pages) on the cache's device, naming pages of
    k_cache (num_pages, page_size, nheads_k, headdim); lengths (batch,), the keys of each
    sequence, must fit in max_pages * page_size (RuntimeError naming block_table, as the
    official package). None skips the data-dependent checks (as under torch.compile).
    """
    if not (
        isinstance(block_table, Tensor)
        and block_table.dtype == torch.int32
        and block_table.dim() == 2
        and block_table.shape[0] == batch
    ):
        raise ValueError(f"block_table must be an int32 tensor of shape ({batch}, max_pages)")
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4:
        raise ValueError(
            "with block_table, k and v must be paged caches (num_pages, page_size, nheads_k, "
            f"headdim), got {getattr(k_cache, 'shape', type(k_cache).__name__)}"
        )
    if isinstance(k_cache, Tensor) and block_table.device != k_cache.device:
        raise ValueError(f"block_table is on {block_table.device} but k is on {k_cache.device}")
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size
    if lengths is None or torch.compiler.is_compiling():
        return capacity
    if ((block_table < 0) | (block_table >= k_cache.shape[0])).any():
        raise ValueError(f"block_table values must be in [0, {k_cache.shape[0]})")
    longest = int(lengths.max().item())
    if longest > capacity:
        raise RuntimeError(
            f"block_table is too short: {block_table.shape[1]} pages of {page_size} positions "
            f"hold {capacity} keys per sequence, but a sequence needs {longest}"
        )
    return capacity
