"""Attention's functional API: checks once per call signature, picks the backend, dispatches.

A call signature is what a call's checks and launches depend on: the shapes, strides, dtypes
and devices of the tensors and the scalar options. The first call of a signature checks every
argument and builds an :class:`AttentionPlan` (the backend, the options and, for Triton, the
kernels' launch plans); later calls of the signature go straight to it. Checks that read tensor
values (the varlen offsets, the page table) would synchronise with a GPU: they run on the first
call of a signature, and on every call for CPU tensors, where they cost no synchronisation.

Under ``torch.compile`` the Triton path goes through the ``torch.library`` ops of
``function.py`` instead, which the compiler traces.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from flash_attn.ops.attention.checks import (
    check_attention_inputs,
    check_flag,
    check_varlen_inputs,
)
from flash_attn.ops.attention.function import (
    AttentionFunction,
    TritonLaunches,
    attention_compiled,
)
from flash_attn.ops.attention.kvcache import gather_pages
from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.torch_backend import attention_torch
from flash_attn.ops.backend import reads_values, resolve_backend
from flash_attn.ops.plans import launch_key

MAX_PLANS = 1024  # call signatures kept; the oldest is dropped past this


class AttentionPlan:
    """What one call signature resolved to: the backend, the options, the varlen maxima
    ((max_seqlen_q, max_seqlen_k) or None) and, for Triton, the launches (built on the first
    call). Calling it attends the tensors of a call, as :func:`attention` returns them."""

    def __init__(self, backend: str, opts: AttentionOptions, varlen: tuple | None):
        self.backend, self.opts, self.varlen = backend, opts, varlen
        self.launches = None

    def __call__(
        self,
        q,
        k,
        v,
        attn_bias,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        block_table,
        return_probs,
    ):
        varlen = self.varlen and (cu_seqlens_q, cu_seqlens_k, *self.varlen)
        if self.backend == "torch":
            if block_table is not None:
                k, v = (gather_pages(t, block_table, cu_seqlens_k) for t in (k, v))
            bias = _expand_bias(attn_bias, q, k, varlen)
            return attention_torch(
                q, k, v, self.opts, bias, alibi_slopes, varlen or None, return_probs
            )
        bias = _expand_bias(_additive_bias(attn_bias, q), q, k, varlen)
        seed = None
        if self.opts.dropout_p > 0.0:
            # Drawn from torch's generator for q's device: reproducible under torch.manual_seed.
            seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
        key_ranges = _paged_key_ranges(cu_seqlens_k) if block_table is not None else None
        tensors = (
            q,
            k,
            v,
            bias,
            alibi_slopes,
            cu_seqlens_q,
            cu_seqlens_k,
            key_ranges,
            block_table,
            seed,
        )
        if torch.compiler.is_compiling():
            out, lse, probs = self._compiled(*tensors, return_probs)
        else:
            launches = self._launches(tensors, return_probs)
            differentiable = (q, k, v, bias)
            if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in differentiable
            ):
                out, lse, probs = AttentionFunction.apply(*tensors, launches)
            else:  # no autograd node to build
                out, lse, probs = launches.attend(*tensors)
        return out, lse, probs if return_probs else None

    def _launches(self, tensors: tuple, return_probs: bool) -> TritonLaunches:
        """The Triton launches, built from the first call's tensors (their metadata only)."""
        if self.launches is None:
            q, k, v, bias, alibi_slopes, cu_seqlens_q, _, _, block_table, _ = tensors
            batch = cu_seqlens_q.numel() - 1 if cu_seqlens_q is not None else q.shape[0]
            self.launches = TritonLaunches(
                q,
                k,
                v,
                self.opts,
                bias=bias,
                alibi_slopes=alibi_slopes,
                varlen=self.varlen,
                batch=batch,
                block_table=block_table,
                return_probs=return_probs,
            )
        return self.launches

    def _compiled(
        self,
        q,
        k,
        v,
        bias,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        key_ranges,
        block_table,
        seed,
        return_probs,
    ):
        max_seqlen_q, max_seqlen_k = self.varlen or (None, None)
        return attention_compiled(
            q,
            k,
            v,
            self.opts,
            bias=bias,
            alibi_slopes=alibi_slopes,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            seed=seed,
            key_ranges=key_ranges,
            block_table=block_table,
            return_probs=return_probs,
        )


def _paged_key_ranges(cu_seqlens_k: Tensor) -> Tensor:
    """(batch, 2) int32: the keys of each sequence of a paged varlen batch start at position 0
    of its pages (see ``triton.forward.sequence``)."""
    from flash_attn.ops.attention.triton.forward import key_ranges_of

    return key_ranges_of(None, cu_seqlens_k=cu_seqlens_k)


def _additive_bias(attn_bias: Tensor | None, q: Tensor) -> Tensor | None:
    """The kernels add the bias: a bool mask becomes 0 where allowed and -inf where not."""
    if attn_bias is None or attn_bias.dtype != torch.bool:
        return attn_bias
    return torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_bias, float("-inf"))


_plans: dict = {}


def _call_signature(tensors: tuple, window_size, options: tuple) -> tuple | None:
    """The key of a call's :class:`AttentionPlan`: the metadata of its tensors, its window and
    its other options; None for a call that is not to be cached (a window given as tensors;
    other options that are not plain scalars fail the checks)."""
    if type(window_size) is not tuple or not all(type(w) is int for w in window_size):
        return None
    return (*map(launch_key, tensors), window_size, *options, os.environ.get("FLASH_ATTN_BACKEND"))


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
    deterministic: bool = False,
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
        deterministic: a bit-reproducible backward (see ``flash_attn.flash_attn_interface``).
    Returns:
        out like q; lse (batch, nheads, seqlen_q), or (nheads, total_q) for varlen, fp32 (the
        torch backend computes it only with return_probs, else None); probs (batch, nheads,
        max_seqlen_q, max_seqlen_k) with dropped weights negated, or None.
    """
    tensors = (q, k, v, attn_bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, block_table)
    key = None  # torch.compile traces the checks and the op instead
    if not torch.compiler.is_compiling():
        options = (
            dropout_p,
            softmax_scale,
            causal,
            softcap,
            max_seqlen_q,
            max_seqlen_k,
            return_probs,
            deterministic,
            backend,
        )
        key = _call_signature(tensors, window_size, options)
    plan = _plans.get(key)
    paged = block_table is not None
    if plan is None or (plan.varlen and reads_values(q)):
        varlen = None
        if cu_seqlens_q is not None or cu_seqlens_k is not None or paged:
            varlen = check_varlen_inputs(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table
            )
    if plan is None:
        check_attention_inputs(
            q,
            k,
            v,
            dropout_p,
            softmax_scale,
            window_size,
            softcap,
            alibi_slopes,
            attn_bias,
            varlen,
            paged=paged,
        )
        causal = check_flag("causal", causal)
        deterministic = check_flag("deterministic", deterministic)
        opts = AttentionOptions.create(
            q.shape[-1], softmax_scale, causal, window_size, softcap, dropout_p, deterministic
        )
        backend = resolve_backend(backend, q.device, q.dtype)
        plan = AttentionPlan(backend, opts, varlen and varlen[2:])
        if key is not None:
            if len(_plans) >= MAX_PLANS:
                del _plans[next(iter(_plans))]
            _plans[key] = plan
    return plan(*tensors, return_probs)


def _expand_bias(attn_bias, q, k, varlen):
    """View attn_bias as (batch, nheads, max_seqlen_q, max_seqlen_k), broadcast dims stride 0."""
    if attn_bias is None:
        return None
    if varlen is None:
        shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    else:
        shape = (varlen[0].numel() - 1, q.shape[1], varlen[2], varlen[3])
    return attn_bias.expand(shape)
