"""Attention: input checks, backend dispatch, and the Triton kernels as torch custom ops.

The Triton path is registered with ``torch.library.custom_op`` (fake + autograd), so
``torch.compile(fullgraph=True)`` traces a function that calls it without graph breaks. The
torch path is plain differentiable PyTorch: ``F.scaled_dot_product_attention`` where it covers
the case, the naive reference where it does not (softcap, returned probabilities).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flash_attn.ops.attention_checks import check_attention_inputs, check_varlen_inputs
from flash_attn.ops.attention_torch import AttentionOptions, attention_torch
from flash_attn.ops.backend import resolve_backend

# ---------------------------------------------------------------------------------------------
# Triton kernels as custom ops. Optional tensors are passed as None; window as two ints.


def _launcher_options(
    bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed,
    softmax_scale, causal, window_left, window_right, softcap, dropout_p,
):  # fmt: skip
    """The custom ops' trailing parameters (same order) as the launchers' keyword options."""
    return dict(
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seed=seed,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=(window_left, window_right),
        softcap=softcap,
        dropout_p=dropout_p,
    )


@torch.library.custom_op("flash_attn::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    seed: Optional[Tensor],
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    from flash_attn.ops.triton.attention import attention_fwd

    return attention_fwd(
        q,
        k,
        v,
        **_launcher_options(
            bias,
            alibi_slopes,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            seed,
            softmax_scale,
            causal,
            window_left,
            window_right,
            softcap,
            dropout_p,
        ),
    )


@_attention_fwd_op.register_fake
def _(
    q,
    k,
    v,
    bias,
    alibi_slopes,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seed,
    *options,
):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])  # (H, total_q)
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Sq)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("flash_attn::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    seed: Optional[Tensor],
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    bias_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from flash_attn.ops.triton.attention_bwd import attention_bwd

    dq, dk, dv, dbias = attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        bias_requires_grad=bias_requires_grad,
        **_launcher_options(
            bias,
            alibi_slopes,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            seed,
            softmax_scale,
            causal,
            window_left,
            window_right,
            softcap,
            dropout_p,
        ),
    )
    # A custom op cannot return None: an empty tensor stands for "no bias gradient".
    return dq, dk, dv, (dbias.to(bias.dtype) if dbias is not None else q.new_empty(0))


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, bias, *rest):
    bias_requires_grad = rest[-1]
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_q, max_k, seed, *opts = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.max_seqlens = (max_q, max_k)
    ctx.opts = opts


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    bias_requires_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_bwd_op(
        dout,
        q,
        k,
        v,
        out,
        lse,
        bias,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        *ctx.max_seqlens,
        seed,
        *ctx.opts,
        bias_requires_grad,
    )
    dbias = dbias if bias_requires_grad else None
    return (dq, dk, dv, dbias) + (None,) * 12


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flash_attn::attention_probs", mutates_args=())
def _attention_probs_op(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    bias: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    seed: Optional[Tensor],
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
) -> Tensor:
    from flash_attn.ops.triton.attention import attention_probs

    return attention_probs(
        q,
        k,
        k,
        lse,
        **_launcher_options(
            bias,
            alibi_slopes,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            seed,
            softmax_scale,
            causal,
            window_left,
            window_right,
            softcap,
            dropout_p,
        ),
    )


@_attention_probs_op.register_fake
def _(q, k, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *rest):
    if cu_seqlens_q is not None:
        shape = (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
    else:
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return q.new_empty(shape)


def _attention_triton(q, k, v, opts: AttentionOptions, bias, alibi_slopes, varlen, return_probs):
    seed = None
    if opts.dropout_p > 0.0:
        # Drawn from torch's generator for q's device: reproducible under torch.manual_seed.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen or (None, None, 0, 0)
    args = (
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seed,
        opts.softmax_scale,
        opts.causal,
        *opts.window_size,
        opts.softcap,
        opts.dropout_p,
    )
    out, lse = _attention_fwd_op(q, k, v, bias, *args)
    if not return_probs:
        return out, lse, None
    detached = bias.detach() if bias is not None else None
    probs = _attention_probs_op(q.detach(), k.detach(), lse.detach(), detached, *args)
    return out, lse, probs


# ---------------------------------------------------------------------------------------------
# Functional API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
    return_probs: bool = False,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scaled dot-product attention, on the backend picked by :func:`resolve_backend`.

    Args:
        q: (batch, seqlen_q, nheads, headdim), or (total_q, nheads, headdim) with cu_seqlens_q.
        k, v: (batch, seqlen_k, nheads_k, headdim), or (total_k, nheads_k, headdim).
            fp16, bf16 or fp32; headdim <= 256; nheads % nheads_k == 0 (GQA/MQA).
        dropout_p: dropout on the attention weights.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal, window_size: bottom-right aligned causal mask; sliding window (left, right),
            -1 for unlimited.
        softcap: scores become softcap * tanh(scores / softcap) when > 0.
        alibi_slopes: (nheads,) or (batch, nheads) fp32.
        attn_bias: float tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k) added to the
            scores (differentiable), or bool of that shape, True where attention is allowed.
        return_probs: also return the probabilities (tests and inspection only: O(seqlen^2)).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of packed sequences;
            max_seqlen_q, max_seqlen_k: their longest lengths.
    Returns:
        out like q; lse (batch, nheads, seqlen_q), or (nheads, total_q) for varlen, fp32 (the
        torch backend computes it only with return_probs, else None); probs (batch, nheads,
        max_seqlen_q, max_seqlen_k) with dropped weights negated, or None.
    """
    varlen = None
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        varlen = check_varlen_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        )
    check_attention_inputs(
        q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes, attn_bias, varlen
    )
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    opts = AttentionOptions(
        float(softmax_scale),
        bool(causal),
        tuple(int(w) for w in window_size),
        float(softcap),
        float(dropout_p),
    )
    run = _attention_triton if resolve_backend(backend, q.device) == "triton" else attention_torch
    if run is _attention_triton and attn_bias is not None and attn_bias.dtype == torch.bool:
        # The kernels add the bias; a mask becomes 0 where allowed and -inf where not.
        attn_bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
            ~attn_bias, float("-inf")
        )
    bias = _expand_bias(attn_bias, q, k, varlen)
    return run(q, k, v, opts, bias, alibi_slopes, varlen, return_probs)


def _expand_bias(attn_bias, q, k, varlen):
    """View attn_bias as (batch, nheads, max_seqlen_q, max_seqlen_k), broadcast dims stride 0."""
    if attn_bias is None:
        return None
    if varlen is None:
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    else:
        shape = (varlen[0].numel() - 1, q.shape[1], varlen[2], varlen[3])
    return attn_bias.expand(shape)
