"""Attention: input checks, backend dispatch, and the Triton kernels as torch custom ops.

The Triton path is registered with ``torch.library.custom_op`` (fake + autograd), so
``torch.compile(fullgraph=True)`` traces a function that calls it without graph breaks. The
torch path is plain differentiable PyTorch: ``F.scaled_dot_product_attention`` where it covers
the case, the naive reference where it does not (softcap, returned probabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from flash_attn.ops.attention_checks import check_attention_inputs, check_varlen_inputs
from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.reference.attention import alibi_bias, attention_ref, window_allowed


@dataclass(frozen=True)
class AttentionOptions:
    """What modifies the scores, shared by every backend (see ``ops/triton/attention.py``)."""

    softmax_scale: float
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    dropout_p: float = 0.0


# ---------------------------------------------------------------------------------------------
# Triton kernels as custom ops. Optional tensors are passed as None; window as two ints.


def _launcher_options(
    opts, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed
):
    return dict(
        softmax_scale=opts[0],
        causal=opts[1],
        window_size=(opts[2], opts[3]),
        softcap=opts[4],
        dropout_p=opts[5],
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seed=seed,
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

    opts = (softmax_scale, causal, window_left, window_right, softcap, dropout_p)
    return attention_fwd(
        q,
        k,
        v,
        **_launcher_options(
            opts, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed
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

    opts = (softmax_scale, causal, window_left, window_right, softcap, dropout_p)
    dq, dk, dv, dbias = attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        bias_requires_grad=bias_requires_grad,
        **_launcher_options(
            opts, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed
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

    opts = (softmax_scale, causal, window_left, window_right, softcap, dropout_p)
    return attention_probs(
        q,
        k,
        k,
        lse,
        **_launcher_options(
            opts, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed
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
# Plain PyTorch


def _attention_torch_dense(q, k, v, opts: AttentionOptions, bias, alibi_slopes, return_probs):
    kwargs = dict(
        window_size=opts.window_size,
        softcap=opts.softcap,
        alibi_slopes=alibi_slopes,
        attn_bias=bias,
    )
    if return_probs or opts.softcap > 0.0:
        # Half-precision math on CPU is emulated anyway: compute in fp32, return in q's dtype.
        compute = torch.float32 if q.dtype != torch.float64 else q.dtype
        keep = None
        if opts.dropout_p > 0.0:
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            keep = torch.rand(shape, device=q.device) >= opts.dropout_p
        out, lse, probs = attention_ref(
            q.to(compute),
            k.to(compute),
            v.to(compute),
            opts.softmax_scale,
            opts.causal,
            opts.dropout_p,
            keep,
            **kwargs,
        )
        if keep is not None:
            probs = torch.where(keep, probs, -probs)
        return out.to(q.dtype), lse.float(), probs.to(q.dtype)

    seqlen_q, nheads, seqlen_k, nheads_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if nheads != nheads_k:
        # (B, Sk, Hk, D) -> (B, Sk, H, D)
        k = repeat(k, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
        v = repeat(v, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    mask = _sdpa_mask(q, seqlen_q, seqlen_k, opts, bias, alibi_slopes)
    empty_rows = None
    if mask is not None:
        # Rows that see no key attend to everything here and are zeroed below, so they are
        # zeros with finite gradients in every torch version.
        blocked = torch.isneginf(mask) if mask.dtype != torch.bool else ~mask
        empty_rows = blocked.all(dim=-1, keepdim=True)  # (..., Sq, 1)
        mask = mask.masked_fill(empty_rows, 0.0 if mask.dtype != torch.bool else True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # (B, S, H, D) -> (B, H, S, D)
        attn_mask=mask,
        dropout_p=opts.dropout_p,
        scale=opts.softmax_scale,
        is_causal=opts.causal and mask is None,
    )  # (B, H, Sq, D)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out.transpose(1, 2).contiguous(), None, None  # (B, H, Sq, D) -> (B, Sq, H, D)


def _sdpa_mask(q, seqlen_q, seqlen_k, opts, bias, alibi_slopes):
    """SDPA's attn_mask for what is_causal cannot say: None, bool (Sq, Sk) or additive float."""
    plain_causal = opts.causal and seqlen_q == seqlen_k and opts.window_size == (-1, -1)
    mask = None
    if (opts.causal and not plain_causal) or opts.window_size != (-1, -1):
        mask = window_allowed(seqlen_q, seqlen_k, opts.causal, opts.window_size, q.device)
    elif plain_causal and (bias is not None or alibi_slopes is not None):
        mask = window_allowed(seqlen_q, seqlen_k, True, device=q.device)
    if bias is None and alibi_slopes is None:
        return mask
    additive = torch.zeros((), dtype=q.dtype, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        mask = bias if mask is None else mask & bias
    elif bias is not None:
        additive = additive + bias.to(q.dtype)
    if alibi_slopes is not None:
        additive = additive + alibi_bias(alibi_slopes, seqlen_q, seqlen_k).to(q.dtype)
    if mask is not None:
        additive = additive.masked_fill(~mask, float("-inf"))
    return additive.expand(*additive.shape[:-2], seqlen_q, seqlen_k)


def _attention_torch(q, k, v, opts: AttentionOptions, bias, alibi_slopes, varlen, return_probs):
    if varlen is None:
        return _attention_torch_dense(q, k, v, opts, bias, alibi_slopes, return_probs)
    # Packed sequences: each is attended alone, so no work is spent on padding.
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses, probs = [], [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b] : starts_q[b + 1]].unsqueeze(0)  # (Sq_b, H, D) -> (1, Sq_b, H, D)
        k_b = k[starts_k[b] : starts_k[b + 1]].unsqueeze(0)
        v_b = v[starts_k[b] : starts_k[b + 1]].unsqueeze(0)
        sq, sk = q_b.shape[1], k_b.shape[1]
        bias_b = None
        if bias is not None:
            bias_b = bias[b : b + 1, :, :sq, :sk]
        slopes_b = (
            alibi_slopes[b]
            if alibi_slopes is not None and alibi_slopes.dim() == 2
            else (alibi_slopes)
        )
        out_b, lse_b, probs_b = _attention_torch_dense(
            q_b, k_b, v_b, opts, bias_b, slopes_b, return_probs
        )
        outs.append(out_b[0])
        if return_probs:
            lses.append(lse_b[0])  # (H, Sq_b)
            probs.append(F.pad(probs_b, (0, max_seqlen_k - sk, 0, max_seqlen_q - sq)))
    out = torch.cat(outs)
    if not return_probs:
        return out, None, None
    return out, torch.cat(lses, dim=1), torch.cat(probs)


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
    run = _attention_triton if resolve_backend(backend, q.device) == "triton" else _attention_torch
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
