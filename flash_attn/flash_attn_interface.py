"""The official flash-attn 2.x functional API: same names, argument order, defaults and shapes.

``flash_attn_with_kvcache`` is defined beside its implementation in
``flash_attn.ops.attention.kvcache`` and re-exported here.

Extensions are keyword-only and come last: ``attn_bias`` (an additive float bias or a boolean
mask, broadcastable to (batch, nheads, seqlen_q, seqlen_k)) and ``backend`` ("auto", "triton" or
"torch"; see ``flash_attn.ops.backend``).

Common arguments:
    dropout_p: dropout probability on the attention weights, a float in [0, 1) (pass 0.0 at
        evaluation).
    softmax_scale: scaling of q k^T, default 1 / sqrt(headdim).
    causal: bool (or the int 0 or 1); causal mask aligned to the bottom-right corner of the
        score matrix; rows that see no key (seqlen_q > seqlen_k) give zeros.
    window_size: (left, right) sliding window around that diagonal, -1 for unlimited; ints or
        0-d integer tensors, or a 1-D integer tensor of two.
    softcap: scores become softcap * tanh(scores / softcap) when > 0.
    alibi_slopes: (nheads,) or (batch, nheads) fp32; adds -slope * |i + seqlen_k - seqlen_q - j|.
    deterministic: False (the default, as in the official package): the backward sums dq with
        atomic adds, in five matrix products per tile; True: it recomputes the scores to sum dq
        in a second pass, bit-reproducible from run to run (the torch backend always is).
    return_attn_probs: also return softmax_lse and S_dmask (for tests): the exact, normalised
        probabilities (the official kernels return per-block unnormalised ones), with dropped
        entries negated.

Masked keys (outside the causal mask or the window, padding, other sequences of a varlen
batch) contribute exactly nothing, even when they hold NaN or inf; a row that sees such a key
gives NaN. Bad arguments raise a TypeError or ValueError that names them.
"""

from __future__ import annotations

from torch import Tensor

from flash_attn.ops.attention import attention
from flash_attn.ops.attention.kvcache import flash_attn_with_kvcache  # noqa: F401 (public API)


def _attend(q, k, v, return_attn_probs: bool, **options):
    """out, or (out, softmax_lse, S_dmask) with return_attn_probs: the functions below, their
    options named (see :func:`flash_attn.ops.attention.attention`)."""
    out, lse, probs = attention(q, k, v, return_probs=return_attn_probs, **options)
    return (out, lse, probs) if return_attn_probs else out


def _unpack(packed: Tensor, name: str, count: int, layout: str) -> tuple[Tensor, ...]:
    if not isinstance(packed, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    dim = packed.dim() - 3
    if packed.dim() not in (4, 5) or packed.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=dim)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """Multi-head attention with FlashAttention.

    Args:
        q: (batch, seqlen_q, nheads, headdim), fp16/bf16/fp32, headdim <= 256.
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (MQA/GQA: query head h
            uses key/value head h // (nheads // nheads_k)).
        others: see the module docstring.
    Returns:
        out (batch, seqlen_q, nheads, headdim); with return_attn_probs, (out, softmax_lse
        (batch, nheads, seqlen_q) fp32, S_dmask (batch, nheads, seqlen_q, seqlen_k)). S_dmask
        holds the exact softmax probabilities, normalised (each row sums to 1, or is all zeros
        for a row that sees no key), negated where dropout dropped the weight; the official
        package returns per-block unnormalised values there.
    """
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """:func:`flash_attn_func` on packed qkv (batch, seqlen, 3, nheads, headdim).

    The kernels read q, k and v in place through strides; the gradient comes back packed.
    """
    q, k, v = _unpack(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)")
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """:func:`flash_attn_func` with packed kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """Attention over packed sequences of different lengths, with no compute on padding.

    Args:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim): the sequences of the
            batch one after another (see ``flash_attn.bert_padding.unpad_input``).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32, sequence b is rows
            cu_seqlens[b]:cu_seqlens[b + 1].
        max_seqlen_q, max_seqlen_k: the longest sequence lengths.
        block_table: (batch, max_pages) int32 or None. When given, k and v are paged caches
            (num_pages, page_size, nheads_k, headdim) (paged prefill, as in vLLM): key j of
            sequence b is k[block_table[b, j // page_size], j % page_size], and
            cu_seqlens_k[b + 1] - cu_seqlens_k[b] is the number of keys of sequence b. A
            RuntimeError names block_table when a sequence outgrows its pages. Gradients
            through the cache need backend="torch".
        attn_bias: broadcastable to (batch, nheads, max_seqlen_q, max_seqlen_k), indexed by
            positions within each sequence.
        others: see the module docstring.
    Returns:
        out (total_q, nheads, headdim); with return_attn_probs, (out, softmax_lse (nheads,
        total_q) fp32, S_dmask (batch, nheads, max_seqlen_q, max_seqlen_k)).
    """
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        block_table=block_table,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """:func:`flash_attn_varlen_func` on packed qkv (total, 3, nheads, headdim)."""
    q, k, v = _unpack(qkv, "qkv", 3, "(total, 3, nheads, headdim)")
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Tensor | None = None,
    backend: str | None = None,
):
    """:func:`flash_attn_varlen_func` with packed kv (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 2, "(total_k, 2, nheads_k, headdim)")
    return _attend(
        q,
        k,
        v,
        return_attn_probs,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=attn_bias,
        deterministic=deterministic,
        backend=backend,
    )
