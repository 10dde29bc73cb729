"""The official flash-attn 2.x functional API: same names, argument order, defaults and shapes.

Extensions are keyword-only and come last: ``backend`` ("auto", "triton" or "torch"; see
``flash_attn.ops.backend``).
"""

from __future__ import annotations

from torch import Tensor

from flash_attn.ops.attention import attention


def _reject_unsupported(window_size, softcap, alibi_slopes) -> None:
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(
            "window_size (sliding-window attention) is not supported yet; pass window_size=(-1, -1)"
        )
    if softcap != 0.0:
        raise NotImplementedError("softcap is not supported yet; pass softcap=0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not supported yet; pass alibi_slopes=None")


def _result(out, lse, probs, return_attn_probs):
    return (out, lse, probs) if return_attn_probs else out


def _unpack(packed: Tensor, name: str, count: int, layout: str) -> tuple[Tensor, ...]:
    if not isinstance(packed, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != 5 or packed.shape[2] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim=2)


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
    backend: str | None = None,
):
    """Multi-head attention with FlashAttention.

    Args:
        q: (batch, seqlen_q, nheads, headdim), fp16/bf16/fp32, headdim <= 256.
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (MQA/GQA: query head h
            uses key/value head h // (nheads // nheads_k)).
        dropout_p: dropout probability on the attention weights (pass 0.0 at evaluation).
        softmax_scale: scaling of q k^T, default 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the score matrix; rows that see
            no key (seqlen_q > seqlen_k) give zeros.
        window_size, softcap, alibi_slopes: must keep their defaults for now.
        deterministic: accepted for compatibility; the backward is always bit-reproducible.
        return_attn_probs: also return softmax_lse and S_dmask (for tests).
        backend: "auto" (default), "triton" or "torch".
    Returns:
        out (batch, seqlen_q, nheads, headdim); with return_attn_probs, (out, softmax_lse
        (batch, nheads, seqlen_q) fp32, S_dmask (batch, nheads, seqlen_q, seqlen_k): the
        probabilities with dropped entries negated).
    """
    _reject_unsupported(window_size, softcap, alibi_slopes)
    out, lse, probs = attention(
        q, k, v, dropout_p, softmax_scale, causal, return_attn_probs, backend=backend
    )
    return _result(out, lse, probs, return_attn_probs)


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
    backend: str | None = None,
):
    """:func:`flash_attn_func` on packed qkv (batch, seqlen, 3, nheads, headdim).

    The kernels read q, k and v in place through strides; the gradient comes back packed.
    """
    q, k, v = _unpack(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
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
    backend: str | None = None,
):
    """:func:`flash_attn_func` with packed kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        backend=backend,
    )
