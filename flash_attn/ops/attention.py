"""Attention: input checks, backend dispatch, and the Triton kernels as torch custom ops.

The Triton path is registered with ``torch.library.custom_op`` (fake + autograd), so
``torch.compile(fullgraph=True)`` traces a function that calls it without graph breaks. The
torch path is plain differentiable PyTorch: ``F.scaled_dot_product_attention`` when only the
output is wanted, the naive reference when the probabilities are asked for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.reference.attention import attention_ref, causal_allowed

MAX_HEADDIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Triton kernels as custom ops


@torch.library.custom_op("flash_attn::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    from flash_attn.ops.triton.attention import attention_fwd

    return attention_fwd(q, k, v, softmax_scale, causal, dropout_p, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, dropout_p, seed):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flash_attn::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.ops.triton.attention import attention_bwd

    return attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal, dropout_p, seed)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.softmax_scale, ctx.causal, ctx.dropout_p = softmax_scale, causal, dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(
        dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.dropout_p, seed
    )
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flash_attn::attention_probs", mutates_args=())
def _attention_probs_op(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    softmax_scale: float,
    causal: bool,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tensor:
    from flash_attn.ops.triton.attention import attention_probs

    return attention_probs(q, k, lse, softmax_scale, causal, dropout_p, seed)


@_attention_probs_op.register_fake
def _(q, k, lse, softmax_scale, causal, dropout_p, seed):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty((batch, nheads, seqlen_q, k.shape[1]))


def _attention_triton(q, k, v, dropout_p, softmax_scale, causal, return_probs):
    seed = None
    if dropout_p > 0.0:
        # Drawn from torch's generator for q's device: reproducible under torch.manual_seed.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
    out, lse = _attention_fwd_op(q, k, v, softmax_scale, causal, dropout_p, seed)
    if not return_probs:
        return out, lse, None
    probs = _attention_probs_op(
        q.detach(), k.detach(), lse.detach(), softmax_scale, causal, dropout_p, seed
    )
    return out, lse, probs


# ---------------------------------------------------------------------------------------------
# Plain PyTorch


def _attention_torch(q, k, v, dropout_p, softmax_scale, causal, return_probs):
    if return_probs:
        # Half-precision math on CPU is emulated anyway: compute in fp32, return in q's dtype.
        compute = torch.float32 if q.dtype != torch.float64 else q.dtype
        batch, seqlen_q, nheads, _ = q.shape
        keep = None
        if dropout_p > 0.0:
            shape = (batch, nheads, seqlen_q, k.shape[1])
            keep = torch.rand(shape, device=q.device) >= dropout_p
        out, lse, probs = attention_ref(
            q.to(compute), k.to(compute), v.to(compute), softmax_scale, causal, dropout_p, keep
        )
        if keep is not None:
            probs = torch.where(keep, probs, -probs)
        return out.to(q.dtype), lse.float(), probs.to(q.dtype)

    seqlen_q, nheads, seqlen_k, nheads_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if nheads != nheads_k:
        # (B, Sk, Hk, D) -> (B, Sk, H, D)
        k = repeat(k, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
        v = repeat(v, "b s hk d -> b s (hk g) d", g=nheads // nheads_k)
    mask, empty_rows = None, 0
    if causal and seqlen_q != seqlen_k:
        # SDPA's is_causal is top-left aligned; ours is bottom-right, so pass the mask. Rows that
        # see no key attend to everything here and are zeroed below: finite in every torch version.
        empty_rows = max(seqlen_q - seqlen_k, 0)
        mask = causal_allowed(seqlen_q, seqlen_k, q.device)
        mask[:empty_rows] = True
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # (B, S, H, D) -> (B, H, S, D)
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal and mask is None,
        scale=softmax_scale,
    ).transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)
    if empty_rows:
        row_is_empty = torch.arange(seqlen_q, device=q.device) < empty_rows
        out = out.masked_fill(row_is_empty[None, :, None, None], 0.0)
    return out.contiguous(), None, None


# ---------------------------------------------------------------------------------------------
# Functional API


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float | None
) -> None:
    """Raise TypeError/ValueError naming the argument when q, k, v cannot be attended.

    Expected: q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k, headdim),
    one floating dtype among fp16/bf16/fp32, one device, unit stride in the last dimension,
    nheads % nheads_k == 0, 1 <= headdim <= 256, 0 <= dropout_p < 1.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), got shape "
                f"{tuple(t.shape)}"
            )
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
    batch, _, nheads, headdim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != batch:
        raise ValueError(f"k and v must have batch {batch} like q, got {k.shape[0]}")
    if k.shape[3] != headdim:
        raise ValueError(f"k and v must have headdim {headdim} like q, got {k.shape[3]}")
    if headdim > MAX_HEADDIM:
        raise ValueError(f"headdim must be at most {MAX_HEADDIM}, got {headdim}")
    if nheads % k.shape[2] != 0:
        raise ValueError(
            f"nheads of q ({nheads}) must be divisible by nheads of k and v ({k.shape[2]})"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_probs: bool = False,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Scaled dot-product attention, on the backend picked by :func:`resolve_backend`.

    Args:
        q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
            fp16, bf16 or fp32; headdim <= 256; nheads % nheads_k == 0 (GQA/MQA).
        dropout_p: dropout on the attention weights.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: bottom-right aligned causal mask.
        return_probs: also return the probabilities (tests and inspection only: O(seqlen^2)).
    Returns:
        out (batch, seqlen_q, nheads, headdim); lse (batch, nheads, seqlen_q) fp32 or None (the
        torch backend computes it only with return_probs); probs (batch, nheads, seqlen_q,
        seqlen_k) with dropped weights negated, or None.
    """
    check_attention_inputs(q, k, v, dropout_p, softmax_scale)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    run = _attention_triton if resolve_backend(backend, q.device) == "triton" else _attention_torch
    return run(q, k, v, float(dropout_p), float(softmax_scale), bool(causal), return_probs)
