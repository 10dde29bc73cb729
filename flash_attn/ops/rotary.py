"""Rotary position embedding: functional API and backend dispatch.

    q = apply_rotary(q, cos, sin)                                  # (B, S, H, D)
    q = apply_rotary(q, cos, sin, seqlen_offsets=cache_lengths)   # decoding with a KV cache
    q = apply_rotary(q, cos, sin, cu_seqlens=cu, max_seqlen=m)    # (total, H, D) varlen

The Triton path is the custom op ``flash_attn::rotary`` (fake + autograd: the backward is the
same rotation conjugated), so ``torch.compile`` traces it; ``inplace=True`` goes through the
mutating op ``flash_attn::rotary_``. The torch path is native PyTorch for the common GPT-NeoX
case and the plain-PyTorch reference otherwise. On both, ``inplace=True`` accepts a leaf that
requires grad, as flash-attn 2.x does: its values are overwritten and its ``.grad`` is the
rotated-back gradient. ``flash_attn.ops.triton.rotary`` re-exports ``apply_rotary``.
"""

from __future__ import annotations

from typing import Optional

import torch

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.custom_op import custom_op
from flash_attn.ops.reference.rotary import apply_rotary_ref

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Both custom ops take: x, cos, sin, seqlen_offsets (a (batch,) tensor, or None for the int
# seqlen_offset), seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate.
@custom_op("flash_attn::rotary")
def _rotary_op(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: Optional[torch.Tensor],
    seqlen_offset: int, cu_seqlens: Optional[torch.Tensor], max_seqlen: int, interleaved: bool,
    conjugate: bool,
) -> torch.Tensor:  # fmt: skip
    """Out-of-place rotation."""
    from flash_attn.ops.kernels.rotary import rotary_fwd

    offsets = seqlen_offset if seqlen_offsets is None else seqlen_offsets
    return rotary_fwd(
        x, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved, inplace=False,
        conjugate=conjugate,
    )  # fmt: skip


@_rotary_op.register_fake
def _(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("flash_attn::rotary_", mutates_args=("x",))
def _rotary_inplace_op(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: Optional[torch.Tensor],
    seqlen_offset: int, cu_seqlens: Optional[torch.Tensor], max_seqlen: int, interleaved: bool,
    conjugate: bool,
) -> None:  # fmt: skip
    """In-place rotation of x."""
    from flash_attn.ops.kernels.rotary import rotary_fwd

    offsets = seqlen_offset if seqlen_offsets is None else seqlen_offsets
    rotary_fwd(
        x, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved, inplace=True, conjugate=conjugate
    )


@_rotary_inplace_op.register_fake
def _(x, *args):
    return None


def _setup_context(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, *rest = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.seqlen_offset = seqlen_offset
    ctx.max_seqlen, ctx.interleaved, ctx.conjugate = rest


def _backward(ctx, dout):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    # A rotation's inverse is its transpose: rotate the gradient back by -angle.
    dx = _rotary_op(dout, cos, sin, seqlen_offsets, ctx.seqlen_offset, cu_seqlens,
                    ctx.max_seqlen, ctx.interleaved, not ctx.conjugate)  # fmt: skip
    return dx, None, None, None, None, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


class _RotaryInplace(torch.autograd.Function):
    """Autograd for the in-place rotation on either backend (mutating custom ops take no
    autograd formula): x is overwritten, its gradient is rotated back as for the out-of-place
    op. Takes the custom ops' arguments, then use_triton."""

    @staticmethod
    def forward(ctx, *args):
        *op_args, use_triton = args
        x = op_args[0]
        if use_triton:
            _rotary_inplace_op(*op_args)
        else:
            x.copy_(_rotary_torch(*op_args))
        # A leaf that requires grad cannot be marked dirty. flash-attn 2.x overwrites it
        # anyway; the returned alias then carries this function's gradient back to the leaf.
        if not (x.is_leaf and x.requires_grad):
            ctx.mark_dirty(x)
        _setup_context(ctx, op_args, x)
        ctx.use_triton = use_triton
        return x

    @staticmethod
    def backward(ctx, dout):
        if ctx.use_triton:
            return _backward(ctx, dout) + (None,)
        cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
        dx = _rotary_torch(dout, cos, sin, seqlen_offsets, ctx.seqlen_offset, cu_seqlens,
                           ctx.max_seqlen, ctx.interleaved, not ctx.conjugate)  # fmt: skip
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
):  # fmt: skip
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
    _check_inputs(x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen)
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes fp16, bf16 or fp32 x, got {x.dtype}")
    offsets_tensor = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset_int = 0 if offsets_tensor is not None else seqlen_offsets
    max_seqlen = max_seqlen if cu_seqlens is not None else x.shape[1]
    args = (x, cos, sin, offsets_tensor, offset_int, cu_seqlens, max_seqlen, interleaved, conjugate)
    if inplace:
        return _RotaryInplace.apply(*args, use_triton)
    return _rotary_op(*args) if use_triton else _rotary_torch(*args)
