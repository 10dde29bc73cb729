"""The Triton path of rotary embedding behind autograd: the custom op ``flash_attn::rotary``
(fake implementation and autograd formula: the backward is the same rotation conjugated), so
``torch.compile`` traces it, and the mutating op ``flash_attn::rotary_`` of ``inplace=True``
(whose autograd is in ``api.py``: mutating custom ops take no formula).

The kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from flash_attn.ops.custom_op import custom_op


# Both custom ops take: x, cos, sin, seqlen_offsets (a (batch,) tensor, or None for the int
# seqlen_offset), seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate.
@custom_op("flash_attn::rotary")
def rotary_op(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Optional[torch.Tensor],
    seqlen_offset: int,
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> torch.Tensor:
    """Out-of-place rotation."""
    from flash_attn.ops.rotary.triton.kernels import rotary_fwd

    offsets = seqlen_offset if seqlen_offsets is None else seqlen_offsets
    return rotary_fwd(
        x,
        cos,
        sin,
        offsets,
        cu_seqlens,
        max_seqlen,
        interleaved,
        inplace=False,
        conjugate=conjugate,
    )


@rotary_op.register_fake
def _(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("flash_attn::rotary_", mutates_args=("x",))
def rotary_inplace_op(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    seqlen_offsets: Optional[torch.Tensor],
    seqlen_offset: int,
    cu_seqlens: Optional[torch.Tensor],
    max_seqlen: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """In-place rotation of x."""
    from flash_attn.ops.rotary.triton.kernels import rotary_fwd

    offsets = seqlen_offset if seqlen_offsets is None else seqlen_offsets
    rotary_fwd(
        x, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved, inplace=True, conjugate=conjugate
    )


@rotary_inplace_op.register_fake
def _(x, *args):
    return None


def rotary_setup_context(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, *rest = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.seqlen_offset = seqlen_offset
    ctx.max_seqlen, ctx.interleaved, ctx.conjugate = rest


def rotary_backward(ctx, dout):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    # A rotation's inverse is its transpose: rotate the gradient back by -angle.
    dx = rotary_op(
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
    return dx, None, None, None, None, None, None, None, None


rotary_op.register_autograd(rotary_backward, setup_context=rotary_setup_context)
