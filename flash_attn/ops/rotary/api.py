"""Rotary position embedding: functional API and backend dispatch.

    q = apply_rotary(q, cos, sin)                                  # (B, S, H, D)
    q = apply_rotary(q, cos, sin, seqlen_offsets=cache_lengths)   # decoding with a KV cache
    q = apply_rotary(q, cos, sin, cu_seqlens=cu, max_seqlen=m)    # (total, H, D) varlen

The Triton path is, in eager mode, :class:`~flash_attn.ops.rotary.function.RotaryFunction` over
the launches of the call signature (kept in its plan), and under ``torch.compile`` the custom op
``flash_attn::rotary`` (fake + autograd: the backward is the same rotation conjugated);
``inplace=True`` goes through the mutating op ``flash_attn::rotary_``. The torch path is native
PyTorch for the common GPT-NeoX case and the plain-PyTorch reference otherwise. On both,
``inplace=True`` accepts a leaf that requires grad, as flash-attn 2.x does: its values are
overwritten and its ``.grad`` is the rotated-back gradient. ``flash_attn.ops.triton.rotary``
re-exports ``apply_rotary``.

Below it, flash-attn 2.x's functional rotary (``apply_rotary_emb``, ``apply_rotary_emb_qkv_``,
``apply_rotary_emb_kv_``), which ``flash_attn.layers.rotary`` re-exports.
"""

from __future__ import annotations

import functools

import torch

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.plans import PlanCache, call_signature
from flash_attn.ops.rotary.function import (
    RotaryFunction,
    RotaryLaunches,
    rotary_backward,
    rotary_inplace_op,
    rotary_op,
    rotary_setup_context,
)
from flash_attn.ops.rotary.reference import apply_rotary_ref

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_plans = PlanCache()  # per call signature of apply_rotary: a _RotaryPlan


class _RotaryPlan:
    """What one call signature of :func:`apply_rotary` resolved to (checked on its first call):
    the backend and, for the Triton path out of place, its launches (built by the first eager
    call)."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        self.launches = None


class _RotaryInplace(torch.autograd.Function):
    """Autograd for the in-place rotation on either backend (mutating custom ops take no
    autograd formula): x is overwritten, its gradient is rotated back as for the out-of-place
    op. Takes the custom ops' arguments, then use_triton."""

    @staticmethod
    def forward(ctx, *args):
        *op_args, use_triton = args
        x = op_args[0]
        if use_triton:
            rotary_inplace_op(*op_args)
        else:
            x.copy_(_rotary_torch(*op_args))
        # A leaf that requires grad cannot be marked dirty. flash-attn 2.x overwrites it
        # anyway; the returned alias then carries this function's gradient back to the leaf.
        if not (x.is_leaf and x.requires_grad):
            ctx.mark_dirty(x)
        rotary_setup_context(ctx, op_args, x)
        ctx.use_triton = use_triton
        return x

    @staticmethod
    def backward(ctx, dout):
        if ctx.use_triton:
            return rotary_backward(ctx, dout) + (None,)
        cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
        dx = _rotary_torch(
            dout,
            cos,
            sin,
            seqlen_offsets,
            ctx.seqlen_offset,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.interleaved,
            not ctx.conjugate,
        )
        return (dx,) + (None,) * 9


def _check_inputs(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen):
    """Validate; return (batch, seqlen): seqlen is max_seqlen for varlen input."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    lengths = None  # (batch,) sequence lengths where known without a device sync
    if cu_seqlens is None:
        if x.ndim != 4:
            raise ValueError(
                f"x must be (batch, seqlen, nheads, headdim), got shape "
                f"{tuple(x.shape)} (pass cu_seqlens for (total_seqlen, nheads, "
                f"headdim))"
            )
        batch, seqlen = x.shape[:2]
    else:
        if x.ndim != 3:
            raise ValueError(
                f"with cu_seqlens, x must be (total_seqlen, nheads, headdim), got "
                f"shape {tuple(x.shape)}"
            )
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.ndim != 1
            or (cu_seqlens.dtype != torch.int32)
        ):
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of shape (batch + 1,)")
        if cu_seqlens.shape[0] < 2:
            raise ValueError("cu_seqlens must have batch + 1 >= 2 entries")
        if not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be an int >= 0 with cu_seqlens, got {max_seqlen!r}")
        batch, seqlen = cu_seqlens.shape[0] - 1, max_seqlen
        if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            lengths = cu_seqlens.diff()
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != x.shape[0] or (lengths < 0).any():
                raise ValueError(
                    f"cu_seqlens must rise from 0 to total_seqlen={x.shape[0]}, "
                    f"got {cu_seqlens.tolist()}"
                )
            if int(lengths.max()) > max_seqlen:
                raise ValueError(
                    f"max_seqlen={max_seqlen} is below the longest sequence ({int(lengths.max())})"
                )
    headdim = x.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float (seqlen_rotary, rotary_dim / 2) tensor")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    seqlen_ro, rotary_dim = cos.shape[0], 2 * cos.shape[1]
    if not 2 <= rotary_dim <= headdim:
        raise ValueError(
            f"rotary_dim = 2 * cos.shape[1] = {rotary_dim} must be in [2, headdim={headdim}]"
        )
    if isinstance(seqlen_offsets, torch.Tensor):
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.is_floating_point():
            raise ValueError(
                f"seqlen_offsets must be an int or an integer tensor of shape "
                f"(batch,) = ({batch},), got {seqlen_offsets.dtype} "
                f"{tuple(seqlen_offsets.shape)}"
            )
        if seqlen_offsets.device != x.device:
            raise ValueError(f"seqlen_offsets is on {seqlen_offsets.device} but x is on {x.device}")
        # Checked where it costs no device sync; on GPU, positions past the table are identity.
        needed = None
        if seqlen_offsets.device.type == "cpu" and not torch.compiler.is_compiling():
            if batch > 0 and int(seqlen_offsets.min()) < 0:
                raise ValueError("seqlen_offsets must be >= 0")
            ends = seqlen_offsets.long() + (lengths if lengths is not None else seqlen)
            needed = int(ends.max()) if batch > 0 else 0
    elif isinstance(seqlen_offsets, int):
        if seqlen_offsets < 0:
            raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets}")
        needed = seqlen + seqlen_offsets
    else:
        raise TypeError(
            f"seqlen_offsets must be an int or a (batch,) tensor, got "
            f"{type(seqlen_offsets).__name__}"
        )
    if needed is not None and seqlen_ro < needed:
        raise ValueError(
            f"cos/sin cover {seqlen_ro} positions, but seqlen + seqlen_offsets reaches {needed}"
        )


def _rotary_neox_torch(x, cos, sin, seqlen_offset: int, conjugate: bool):
    """The common case in fewer, larger PyTorch ops than the reference: GPT-NeoX layout, one
    offset for the batch, so the tables are a slice (no gather) and the halves are rotated
    as x * cos + rotate_half(x) * sin, as Hugging Face does (but in fp32)."""
    seqlen, rotary_dim = x.shape[1], 2 * cos.shape[1]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    # (seqlen, rotary_dim / 2) -> (seqlen, 1, rotary_dim): each half sees the same angles
    c = cos[seqlen_offset : seqlen_offset + seqlen].to(compute_dtype).repeat(1, 2).unsqueeze(1)
    s = sin[seqlen_offset : seqlen_offset + seqlen].to(compute_dtype).repeat(1, 2).unsqueeze(1)
    rot = x[..., :rotary_dim].to(compute_dtype)
    x0, x1 = rot.chunk(2, dim=-1)
    rotated_half = torch.cat((x1, -x0), dim=-1) if conjugate else torch.cat((-x1, x0), dim=-1)
    out = (rot * c + rotated_half * s).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


def _rotary_torch(
    x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate
):
    """The torch backend, out of place, with the custom ops' arguments (differentiable)."""
    if cu_seqlens is None and seqlen_offsets is None and not interleaved:
        return _rotary_neox_torch(x, cos, sin, seqlen_offset, conjugate)
    offsets = seqlen_offset if seqlen_offsets is None else seqlen_offsets
    return apply_rotary_ref(
        x, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved, conjugate=conjugate
    )


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    conjugate: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate the first rotary_dim features of every head of x by its position's angle.

    Args:
        x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) when cu_seqlens
            is given; fp16/bf16/fp32 (fp64 too on the torch backend).
        cos, sin: (seqlen_rotary, rotary_dim / 2) with rotary_dim <= headdim; features past
            rotary_dim are left untouched. seqlen_rotary >= seqlen + seqlen_offsets.
        seqlen_offsets: int, or (batch,) int32 tensor: the position of each sequence's first
            token (KV-cache decoding).
        cu_seqlens: (batch + 1,) int32 cumulative sequence lengths from 0 to total_seqlen.
        max_seqlen: the longest sequence, required with cu_seqlens.
        interleaved: GPT-J layout, pairs (2i, 2i + 1); default GPT-NeoX, (i, i + rotary_dim/2).
        inplace: write the result into x and return x (x may be a leaf that requires grad).
        conjugate: rotate by -angle (the inverse rotation).
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``.
    Returns:
        x's shape and dtype.
    Raises:
        ValueError: shapes, rotary_dim > headdim, cos/sin shorter than seqlen + offset,
            bad cu_seqlens / max_seqlen / seqlen_offsets. TypeError: dtypes.
    """
    offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset_int = 0 if offsets_tensor is not None else seqlen_offsets
    key = call_signature(
        (x, cos, sin, offsets_tensor, cu_seqlens),
        (offset_int, max_seqlen, interleaved, inplace, conjugate, backend),
    )
    plan = _plans.get(key)
    reads = cu_seqlens is not None or offsets_tensor is not None
    if plan is None or (reads and x.device.type == "cpu"):
        # The checks of the values of CPU tensors run at every call (they cost no sync).
        _check_inputs(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen)
    if plan is None:
        use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
        if use_triton and x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes fp16, bf16 or fp32 x, got {x.dtype}")
        plan = _plans.keep(key, _RotaryPlan(use_triton))
    max_seqlen = max_seqlen if cu_seqlens is not None else x.shape[1]
    if plan.use_triton and not inplace and not torch.compiler.is_compiling():
        tensors = (x, cos, sin, offsets_tensor, cu_seqlens)
        if plan.launches is None:
            plan.launches = RotaryLaunches(
                *tensors,
                seqlen_offset=offset_int,
                max_seqlen=max_seqlen,
                interleaved=interleaved,
                conjugate=conjugate,
            )
        if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
            return RotaryFunction.apply(*tensors, plan.launches)
        return plan.launches.forward(*tensors)
    args = (x, cos, sin, offsets_tensor, offset_int, cu_seqlens, max_seqlen, interleaved, conjugate)
    if inplace:
        return _RotaryInplace.apply(*args, plan.use_triton)
    return rotary_op(*args) if plan.use_triton else _rotary_torch(*args)


# flash-attn 2.x's functional rotary (``flash_attn.layers.rotary`` re-exports it). Layouts:
# ``qkv`` (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, nheads_q + 2 * nheads_k,
# headdim) with ``num_heads_q``; ``kv`` (batch, seqlen, 2, nheads_k, headdim).


def apply_rotary_emb(
    x,
    cos,
    sin,
    interleaved=False,
    inplace=False,
    seqlen_offsets=0,
    cu_seqlens=None,
    max_seqlen=None,
):
    """Rotate x (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with
    cu_seqlens, by cos/sin (seqlen_rotary, rotary_dim / 2). Returns x's shape and dtype."""
    return apply_rotary(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace)


def _split_qk(qkv: torch.Tensor, num_heads_q: int | None):
    """Views of q and k inside qkv (see the layouts above)."""
    if num_heads_q is None:
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise ValueError(
                f"qkv must be (batch, seqlen, 3, nheads, headdim) without num_heads_q, "
                f"got {tuple(qkv.shape)}"
            )
        return qkv[:, :, 0], qkv[:, :, 1]
    num_heads_k = (qkv.shape[2] - num_heads_q) // 2
    if qkv.dim() != 4 or num_heads_k < 1 or num_heads_q + 2 * num_heads_k != qkv.shape[2]:
        raise ValueError(
            f"qkv must be (batch, seqlen, num_heads_q + 2 * nheads_k, headdim) with "
            f"num_heads_q={num_heads_q}, got {tuple(qkv.shape)}"
        )
    return qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]


class _RotateViewsInplace(torch.autograd.Function):
    """Rotate views of a packed tensor in place (q and k of qkv, k of kv) as one autograd node,
    as flash-attn 2.x does: a leaf that requires grad is overwritten too, and its gradient is
    the upstream gradient with the same views rotated back.

    Takes packed, then views (packed -> the views to rotate), tables (one (cos, sin) per
    view), interleaved and seqlen_offsets; returns packed."""

    @staticmethod
    def forward(ctx, packed, views, tables, interleaved, seqlen_offsets):
        _rotate_views(packed, views, tables, interleaved, seqlen_offsets, conjugate=False)
        # A leaf that requires grad cannot be marked dirty; the returned alias then carries
        # this function's gradient back to it.
        if not (packed.is_leaf and packed.requires_grad):
            ctx.mark_dirty(packed)
        ctx.views, ctx.tables = views, tables
        ctx.interleaved, ctx.seqlen_offsets = interleaved, seqlen_offsets
        return packed

    @staticmethod
    def backward(ctx, dout):
        dpacked = dout.clone()
        _rotate_views(
            dpacked, ctx.views, ctx.tables, ctx.interleaved, ctx.seqlen_offsets, conjugate=True
        )
        return dpacked, None, None, None, None


def _rotate_views(packed, views, tables, interleaved, seqlen_offsets, conjugate):
    for x, (cos, sin) in zip(views(packed), tables):
        # Out of place, then copied: the views are strided inside packed.
        x.copy_(
            apply_rotary(x, cos, sin, seqlen_offsets, interleaved=interleaved, conjugate=conjugate)
        )


def apply_rotary_emb_qkv_(
    qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0, num_heads_q=None
):
    """Rotate q and k inside qkv in place (k by cos_k/sin_k when given); returns qkv.
    Differentiable, also for a leaf that requires grad (see the layouts above)."""
    _split_qk(qkv, num_heads_q)  # checks the layout before anything is written
    tables = ((cos, sin), (cos, sin) if cos_k is None else (cos_k, sin_k))
    views = functools.partial(_split_qk, num_heads_q=num_heads_q)
    return _RotateViewsInplace.apply(qkv, views, tables, interleaved, seqlen_offsets)


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotate k = kv[:, :, 0] in place; returns kv (batch, seqlen, 2, nheads_k, headdim).
    Differentiable, also for a leaf that requires grad."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be (batch, seqlen, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return _RotateViewsInplace.apply(kv, _k_of_kv, ((cos, sin),), interleaved, seqlen_offsets)


def _k_of_kv(kv: torch.Tensor) -> tuple[torch.Tensor]:
    return (kv[:, :, 0],)


apply_rotary_emb_func = apply_rotary_emb
