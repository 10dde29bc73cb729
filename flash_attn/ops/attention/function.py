"""The Triton path of attention behind autograd, two ways over the same launches.

- Eager: :class:`AttentionFunction`, one ``torch.autograd.Function`` whose forward and backward
  call the launch plans of :class:`TritonLaunches` (cached per call signature by ``api.py``):
  between the public call and the kernel there are a few lines of Python.
- Under ``torch.compile``: the ``flash_attn::attention_forward`` / ``attention_backward``
  ``torch.library`` ops, whose schemas are written out below and whose fake implementations
  give the output shapes, so ``torch.compile(fullgraph=True)`` traces them without graph breaks.
"""

from __future__ import annotations

import torch

from flash_attn.ops.attention.options import AttentionOptions

_PAGED_BACKWARD = (
    "block_table: the triton backend attends to a paged cache without gradients (inference); "
    "run the backward through backend='torch'"
)


class TritonLaunches:
    """The forward and backward launches of one call signature (shapes, strides, dtypes,
    options). Built from the first call's tensors, which it reads only the metadata of.

    Args:
        q, k, v, bias (expanded), alibi_slopes: as the kernels take them; opts: the options.
        varlen: (max_seqlen_q, max_seqlen_k) of packed sequences, or None; batch: batch size.
        paged: k and v are paged caches read through a block_table (forward only).
        return_probs: the forward also stores the probabilities.
    """

    def __init__(
        self,
        q,
        k,
        v,
        opts: AttentionOptions,
        *,
        bias,
        alibi_slopes,
        varlen,
        batch,
        block_table,
        return_probs,
    ):
        from flash_attn.ops.attention.triton.forward import ForwardLaunch

        max_seqlen_q, max_seqlen_k = varlen or (None, None)
        # The backward is built later from this: metadata stand-ins, not the call's tensors.
        self.description = dict(
            opts=opts,
            batch=batch,
            bias=_layout_of(bias),
            alibi_slopes=_layout_of(alibi_slopes),
            varlen=varlen is not None,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )
        self.forward = ForwardLaunch(
            q,
            k,
            v,
            key_ranges=block_table is not None,
            block_table=block_table,
            store_probs=return_probs,
            **self.description,
        )
        self.probs_shape = None
        if return_probs:
            seqlen_q = max_seqlen_q if varlen else q.shape[1]
            seqlen_k = max_seqlen_k if varlen else k.shape[1]
            self.probs_shape = (batch, q.shape[-2], seqlen_q, seqlen_k)
        self._backward = {}

    def attend(
        self, q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, key_ranges, block_table, seed
    ):
        """(out, lse, probs or None) of the forward launch, outside autograd: the arguments of
        :class:`AttentionFunction` but the launches."""
        probs = q.new_zeros(self.probs_shape) if self.probs_shape is not None else None
        out, lse = self.forward(
            q,
            k,
            v,
            bias=bias,
            alibi_slopes=alibi_slopes,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            key_ranges=key_ranges,
            block_table=block_table,
            seed=seed,
            probs=probs,
        )
        return out, lse, probs

    def backward(self, q, k, v, bias_requires_grad: bool):
        """The backward launch (built on first use, with or without the bias gradient)."""
        launch = self._backward.get(bias_requires_grad)
        if launch is None:
            from flash_attn.ops.attention.triton.backward import BackwardLaunch

            launch = BackwardLaunch(
                q, k, v, bias_requires_grad=bias_requires_grad, **self.description
            )
            self._backward[bias_requires_grad] = launch
        return launch


def _layout_of(t):
    """A meta tensor with t's shape, strides and dtype (None stays None): what the launches
    read of an optional input, without keeping its memory alive."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class AttentionFunction(torch.autograd.Function):
    """out, lse, probs = AttentionFunction.apply(q, k, v, bias, alibi_slopes, cu_seqlens_q,
    cu_seqlens_k, key_ranges, block_table, seed, launches): attention through ``launches`` (a
    :class:`TritonLaunches`). bias: expanded (batch, nheads, seqlen_q, seqlen_k) or None;
    probs: empty unless the launches store them. Gradients flow to q, k, v and bias; a paged
    cache (block_table) has none, and asking for them raises a ValueError naming it."""

    @staticmethod
    def forward(ctx, *tensors_and_launches):
        *tensors, launches = tensors_and_launches
        q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, _, block_table, seed = tensors
        out, lse, probs = launches.attend(*tensors)
        probs = probs if probs is not None else q.new_empty(0)
        ctx.mark_non_differentiable(lse, probs)
        ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates
        ctx.save_for_backward(
            q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed
        )
        ctx.launches, ctx.paged = launches, block_table is not None
        return out, lse, probs

    @staticmethod
    def backward(ctx, dout, _dlse, _dprobs):
        if ctx.paged:
            raise ValueError(_PAGED_BACKWARD)
        if dout is None:  # the output's gradient is undefined (a function upstream gave None)
            return (None,) * 11
        q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
        bias_requires_grad = ctx.needs_input_grad[3]
        launch = ctx.launches.backward(q, k, v, bias_requires_grad)
        dq, dk, dv, dbias = launch(
            dout,
            q,
            k,
            v,
            out,
            lse,
            bias=bias,
            alibi_slopes=alibi_slopes,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            seed=seed,
        )
        dbias = dbias.to(bias.dtype) if dbias is not None else None
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# torch.library ops, for torch.compile

# The fields of AttentionOptions, in their order: the ops take them last, as ``*options``.
OPTIONS_SCHEMA = (
    "float softmax_scale, bool causal, SymInt window_left, SymInt window_right, float softcap, "
    "float dropout_p, bool deterministic"
)
_INPUTS_SCHEMA = (
    "Tensor? bias, Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? seed"
)
# The forward's reads of a KV cache or paged keys (see ForwardLaunch), without gradients.
_CACHE_SCHEMA = "Tensor? key_ranges, Tensor? k_batch_idx, Tensor? block_table, int num_splits"


@torch.library.custom_op(
    "flash_attn::attention_forward",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {_INPUTS_SCHEMA}, {_CACHE_SCHEMA}, "
    f"bool return_probs, {OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)
def attention_forward_op(
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
    key_ranges,
    k_batch_idx,
    block_table,
    num_splits,
    return_probs,
    *options,
):
    """(out, lse, probs); probs is empty unless return_probs (an op cannot return None)."""
    from flash_attn.ops.attention.triton.forward import attention_fwd

    opts = AttentionOptions(*options)
    probs = q.new_zeros(_probs_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_probs))
    out, lse = attention_fwd(
        q,
        k,
        v,
        opts,
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k or None,
        seed=seed,
        key_ranges=key_ranges,
        k_batch_idx=k_batch_idx,
        block_table=block_table,
        num_splits=num_splits,
        probs=probs if return_probs else None,
    )
    return out, lse, probs


def _probs_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_probs):
    """(batch, nheads, max_seqlen_q, max_seqlen_k) of the probabilities, or (0,)."""
    if not return_probs:
        return (0,)
    if cu_seqlens_q is not None:
        return (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
    return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])


@attention_forward_op.register_fake
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
    key_ranges,
    k_batch_idx,
    block_table,
    num_splits,
    return_probs,
    *options,
):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])  # (H, total_q)
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (B, H, Sq)
    probs = q.new_empty(_probs_shape(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, return_probs))
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32), probs


@torch.library.custom_op(
    "flash_attn::attention_backward",
    mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_INPUTS_SCHEMA}, "
    f"bool bias_requires_grad, {OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
)
def attention_backward_op(
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
    max_seqlen_q,
    max_seqlen_k,
    seed,
    bias_requires_grad,
    *options,
):
    """(dq, dk, dv, dbias); dbias is empty without bias_requires_grad."""
    from flash_attn.ops.attention.triton.backward import attention_bwd

    opts = AttentionOptions(*options)
    dq, dk, dv, dbias = attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        opts,
        bias=bias,
        alibi_slopes=alibi_slopes,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seed=seed,
        bias_requires_grad=bias_requires_grad,
    )
    return dq, dk, dv, (dbias.to(bias.dtype) if dbias is not None else q.new_empty(0))


@attention_backward_op.register_fake
def _(
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
    max_seqlen_q,
    max_seqlen_k,
    seed,
    bias_requires_grad,
    *options,
):
    dbias = bias.new_empty(bias.shape) if bias_requires_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_q, max_k, seed, *rest = inputs
    key_ranges, k_batch_idx, block_table, num_splits, return_probs, *options = rest
    out, lse, probs = output
    ctx.mark_non_differentiable(lse, probs)
    ctx.set_materialize_grads(False)  # no zeros for the outputs nobody differentiates
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.max_seqlens, ctx.options, ctx.inputs = (max_q, max_k), options, len(inputs)
    ctx.paged = block_table is not None


def _backward(ctx, dout, _dlse, _dprobs):
    if ctx.paged:
        raise ValueError(_PAGED_BACKWARD)
    if dout is None:  # the output's gradient is undefined (a function upstream returned None)
        return (None,) * ctx.inputs
    q, k, v, out, lse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    bias_requires_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = attention_backward_op(
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
        bias_requires_grad,
        *ctx.options,
    )
    grads = (dq, dk, dv, dbias if bias_requires_grad else None)
    return grads + (None,) * (ctx.inputs - len(grads))


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention_compiled(
    q,
    k,
    v,
    opts: AttentionOptions,
    *,
    bias=None,
    alibi_slopes=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seed=None,
    key_ranges=None,
    k_batch_idx=None,
    block_table=None,
    num_splits=1,
    return_probs=False,
):
    """(out, lse, probs) through the torch.library op (what torch.compile traces); arguments as
    :class:`~flash_attn.ops.attention.triton.forward.ForwardLaunch` and its call take them."""
    return attention_forward_op(
        q,
        k,
        v,
        bias,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q or 0,
        max_seqlen_k or 0,
        seed,
        key_ranges,
        k_batch_idx,
        block_table,
        num_splits,
        return_probs,
        *opts.values(),
    )
