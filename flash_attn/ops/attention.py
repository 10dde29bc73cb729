"""Attention: input checks, backend dispatch, and the Triton kernels as torch custom ops.

The Triton path is registered with ``torch.library.custom_op`` (fake + autograd), so
``torch.compile(fullgraph=True)`` traces a function that calls it without graph breaks. The
torch path is plain differentiable PyTorch: ``F.scaled_dot_product_attention`` where it covers
the case, the naive reference where it does not (softcap, returned probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from flash_attn.ops.attention_checks import (
    check_attention_inputs,
    check_flag,
    check_varlen_inputs,
)
from flash_attn.ops.attention_kvcache import gather_pages
from flash_attn.ops.attention_options import AttentionOptions
from flash_attn.ops.attention_torch import attention_torch
from flash_attn.ops.backend import resolve_backend

# ---------------------------------------------------------------------------------------------
# Triton kernels as custom ops


@dataclass(frozen=True)
class KernelInputs:
    """The tensors and sizes beside q, k, v that the Triton launchers take as keywords."""

    bias: Tensor | None  # expanded to (batch, nheads, max_seqlen_q, max_seqlen_k)
    alibi_slopes: Tensor | None
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    seed: Tensor | None  # (1,) int64 when dropout_p > 0
    block_table: Tensor | None  # (batch, max_pages) int32: k and v are paged caches (varlen)


# Every custom op takes its own tensors, then these fields, flattened in this order: a custom
# op's parameters must be typed scalars and tensors, so its schema is derived from the fields.
_SHARED_FIELDS = fields(KernelInputs) + fields(AttentionOptions)
_SCHEMA_TYPES = {"Tensor | None": "Tensor?", "int": "SymInt", "float": "float", "bool": "bool"}
_SHARED_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in _SHARED_FIELDS)


def _flatten(inputs: KernelInputs, opts: AttentionOptions) -> tuple:
    return tuple(getattr(x, f.name) for x in (inputs, opts) for f in fields(x))


def _unflatten(shared) -> tuple[KernelInputs, AttentionOptions]:
    count = len(fields(KernelInputs))
    return KernelInputs(*shared[:count]), AttentionOptions(*shared[count:])


def _launch(launcher, *tensors, shared, **extra):
    """Call a Triton launcher with the custom op's flattened shared parameters."""
    inputs, opts = _unflatten(shared)
    return launcher(*tensors, opts, **vars(inputs), **extra)


def _custom_op(name: str, tensors: str, returns: str):
    """torch.library.custom_op with the schema ``(tensors, shared fields) -> returns``."""
    schema = f"({tensors}, {_SHARED_SCHEMA}) -> {returns}"
    return torch.library.custom_op(f"flash_attn::{name}", mutates_args=(), schema=schema)


@_custom_op("attention_fwd", "Tensor q, Tensor k, Tensor v, bool return_probs",
            "(Tensor, Tensor, Tensor)")  # fmt: skip
def _attention_fwd_op(q, k, v, return_probs, *shared):
    """(out, lse, probs); probs is empty unless return_probs (a custom op cannot return None)."""
    from flash_attn.ops.kernels.attention import attention_fwd

    probs = q.new_zeros(_probs_shape(q, k, shared) if return_probs else 0)
    out, lse = _launch(attention_fwd, q, k, v, shared=shared,
                       probs=probs if return_probs else None)  # fmt: skip
    return out, lse, probs


def _probs_shape(q, k, shared):
    """(batch, nheads, max_seqlen_q, max_seqlen_k) of the probabilities."""
    inputs = _unflatten(shared)[0]
    if inputs.cu_seqlens_q is not None:
        batch = inputs.cu_seqlens_q.shape[0] - 1
        return (batch, q.shape[1], inputs.max_seqlen_q, inputs.max_seqlen_k)
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])


@_attention_fwd_op.register_fake
def _(q, k, v, return_probs, *shared):
    if _unflatten(shared)[0].cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])  # (H, total_q)
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Sq)
    probs = q.new_empty(_probs_shape(q, k, shared) if return_probs else 0)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32), probs


@_custom_op(
    "attention_bwd",
    "Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool bias_requires_grad",
    "(Tensor, Tensor, Tensor, Tensor)",
)
def _attention_bwd_op(dout, q, k, v, out, lse, bias_requires_grad, *shared):
    from flash_attn.ops.kernels.attention_bwd import attention_bwd

    dq, dk, dv, dbias = _launch(attention_bwd, dout, q, k, v, out, lse, shared=shared,
                                bias_requires_grad=bias_requires_grad)  # fmt: skip
    # A custom op cannot return None: an empty tensor stands for "no bias gradient".
    bias = _unflatten(shared)[0].bias
    return dq, dk, dv, (dbias.to(bias.dtype) if dbias is not None else q.new_empty(0))


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, bias_requires_grad, *shared):
    bias = _unflatten(shared)[0].bias
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    # Tensors go through save_for_backward; scalars (and absent tensors) ride on ctx.
    out, lse, probs = output
    ctx.mark_non_differentiable(probs)
    ctx.save_for_backward(out, lse, *(x if isinstance(x, Tensor) else None for x in inputs))
    ctx.scalars = [None if isinstance(x, Tensor) else x for x in inputs]


def _backward(ctx, dout, dlse, dprobs):
    out, lse, *saved = ctx.saved_tensors
    q, k, v, _, *shared = [x if x is not None else s for x, s in zip(saved, ctx.scalars)]
    bias = _unflatten(shared)[0].bias
    bias_requires_grad = bias is not None and ctx.needs_input_grad[4]  # bias: shared[0]
    dq, dk, dv, dbias = _attention_bwd_op(dout, q, k, v, out, lse, bias_requires_grad, *shared)
    dbias = dbias if bias_requires_grad else None
    # One gradient per input: q, k, v, return_probs, bias, then None for the other shared fields.
    return (dq, dk, dv, None, dbias) + (None,) * (len(_SHARED_FIELDS) - 1)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q, k, v, opts: AttentionOptions, bias, alibi_slopes, varlen, return_probs,
                      block_table=None):  # fmt: skip
    if (
        block_table is not None
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    ):
        raise ValueError(
            "block_table: the triton backend attends to a paged cache without gradients "
            "(inference); run under torch.no_grad(), or pass backend='torch'"
        )
    seed = None
    if opts.dropout_p > 0.0:
        # Drawn from torch's generator for q's device: reproducible under torch.manual_seed.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = varlen or (None, None, 0, 0)
    inputs = KernelInputs(bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, seed, block_table)  # fmt: skip
    out, lse, probs = _attention_fwd_op(q, k, v, return_probs, *_flatten(inputs, opts))
    return out, lse, probs if return_probs else None


# ---------------------------------------------------------------------------------------------
# Functional API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: Tensor | None,
    attn_bias: Tensor | None,
    return_probs: bool,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_table: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scaled dot-product attention, on the backend picked by :func:`resolve_backend`.

    Args:
        q: (batch, seqlen_q, nheads, headdim), or (total_q, nheads, headdim) with cu_seqlens_q.
        k, v: (batch, seqlen_k, nheads_k, headdim), or (total_k, nheads_k, headdim).
            fp16, bf16 or fp32; headdim <= 256; nheads % nheads_k == 0 (GQA/MQA).
        dropout_p, softmax_scale (None: 1 / sqrt(headdim)), causal, window_size, softcap,
            alibi_slopes: as in ``flash_attn.flash_attn_interface``, which gives the defaults.
        attn_bias: float tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k) added to the
            scores (differentiable), or bool of that shape, True where attention is allowed.
        return_probs: also return the probabilities (tests and inspection only: O(seqlen^2)).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 offsets of packed sequences;
            max_seqlen_q, max_seqlen_k: their longest lengths.
        block_table: (batch, max_pages) int32, varlen only: k and v are then paged caches
            (num_pages, page_size, nheads_k, headdim), key j of sequence b lives at
            [block_table[b, j // page_size], j % page_size], and cu_seqlens_k counts the keys
            of each sequence. Without gradients on the triton backend.
    Returns:
        out like q; lse (batch, nheads, seqlen_q), or (nheads, total_q) for varlen, fp32 (the
        torch backend computes it only with return_probs, else None); probs (batch, nheads,
        max_seqlen_q, max_seqlen_k) with dropped weights negated, or None.
    """
    varlen = None
    if cu_seqlens_q is not None or cu_seqlens_k is not None or block_table is not None:
        varlen = check_varlen_inputs(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table
        )
    check_attention_inputs(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                           attn_bias, varlen, paged=block_table is not None)  # fmt: skip
    opts = AttentionOptions.create(
        q.shape[-1], softmax_scale, check_flag("causal", causal), window_size, softcap, dropout_p
    )
    bias = attn_bias
    if resolve_backend(backend, q.device, q.dtype) == "torch":
        if block_table is not None:
            k, v = (gather_pages(t, block_table, cu_seqlens_k) for t in (k, v))
        bias = _expand_bias(bias, q, k, varlen)
        return attention_torch(q, k, v, opts, bias, alibi_slopes, varlen, return_probs)
    if bias is not None and bias.dtype == torch.bool:
        # The kernels add the bias; a mask becomes 0 where allowed and -inf where not.
        bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    bias = _expand_bias(bias, q, k, varlen)
    return _attention_triton(q, k, v, opts, bias, alibi_slopes, varlen, return_probs, block_table)


def _expand_bias(attn_bias, q, k, varlen):
    """View attn_bias as (batch, nheads, max_seqlen_q, max_seqlen_k), broadcast dims stride 0."""
    if attn_bias is None:
        return None
    if varlen is None:
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    else:
        shape = (varlen[0].numel() - 1, q.shape[1], varlen[2], varlen[3])
    return attn_bias.expand(shape)
