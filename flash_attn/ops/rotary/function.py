"""The Triton path of rotary embedding behind autograd, two ways over the same launches (as
LayerNorm's):

- Eager: :class:`RotaryFunction`, one ``torch.autograd.Function`` whose forward and backward
  call the :class:`RotaryLaunches` of the call signature (``api.py`` keeps them in its plan).
- Under ``torch.compile``: the custom op ``flash_attn::rotary`` (fake implementation and
  autograd formula), and the mutating op ``flash_attn::rotary_`` of ``inplace=True`` (whose
  autograd is in ``api.py``: mutating custom ops take no formula; it serves eager calls too).

Both differentiate alike: the backward is the same rotation conjugated (a rotation's inverse is
its transpose), given the saved (cos, sin, seqlen_offsets, cu_seqlens). The
kernels are imported inside each op so that ``import flash_attn`` works without Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from flash_attn.ops.custom_op import custom_op
from flash_attn.ops.plans import contiguous_aligned


class RotaryLaunches:
    """The forward and backward launches of one call signature of ``apply_rotary`` (out of
    place), built from its first call's tensors (their metadata only): ``forward`` is a
    :class:`~flash_attn.ops.rotary.triton.kernels.RotaryLaunch`; ``backward`` rotates a
    gradient back with another, built on first use.

    Args: the five tensors of :class:`RotaryFunction` (x, cos, sin, seqlen_offsets or None,
    cu_seqlens or None) and ``RotaryLaunch``'s options (seqlen_offset, max_seqlen, interleaved,
    conjugate).
    """

    def __init__(self, x, cos, sin, seqlen_offsets, cu_seqlens, **options):
        from flash_attn.ops.rotary.triton.kernels import RotaryLaunch

        self.options = options
        self.forward = RotaryLaunch(x, cos, sin, seqlen_offsets, cu_seqlens, **options)
        self._backward = {}

    def backward(self, dout, cos, sin, seqlen_offsets, cu_seqlens):
        """dout (x's shape, any layout: made contiguous and aligned, as the launch was built
        for) rotated back by -angle; x's shape, contiguous."""
        dout = contiguous_aligned(dout)
        launch = self._backward.get(dout.dtype)
        if launch is None:
            from flash_attn.ops.rotary.triton.kernels import RotaryLaunch

            options = dict(self.options, conjugate=not self.options["conjugate"])
            launch = RotaryLaunch(dout, cos, sin, seqlen_offsets, cu_seqlens, **options)
            self._backward[dout.dtype] = launch
        return launch(dout, cos, sin, seqlen_offsets, cu_seqlens)


class RotaryFunction(torch.autograd.Function):
    """out = RotaryFunction.apply(x, cos, sin, seqlen_offsets, cu_seqlens, launches): the
    forward of ``launches`` (a :class:`RotaryLaunches`), x's shape and dtype, contiguous; the
    gradient flows to x."""

    @staticmethod
    def forward(ctx, x, cos, sin, seqlen_offsets, cu_seqlens, launches):
        ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
        ctx.launches = launches
        return launches.forward(x, cos, sin, seqlen_offsets, cu_seqlens)

    @staticmethod
    def backward(ctx, dout):
        dx = ctx.launches.backward(dout, *ctx.saved_tensors)  # saved: cos, sin, offsets, cu
        return dx, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# torch.library ops, for torch.compile (and the in-place rotation)


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
