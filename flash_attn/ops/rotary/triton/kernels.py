"""Rotary position embedding in Triton, and its launches (:class:`RotaryLaunch`, built once per
call signature; :func:`rotary_fwd` keeps one per signature).

Layout: x (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens
for variable-length batches; any strides with a unit last stride. cos and sin are
(seqlen_rotary, rotary_dim // 2). The first rotary_dim features of each head are rotated in
pairs: (i, i + rotary_dim // 2) in the GPT-NeoX layout, (2i, 2i + 1) in the GPT-J (interleaved)
layout. Token m of sequence b sits at position m + seqlen_offsets[b] (KV-cache decoding).

One program rotates BLOCK_M positions of one head of one sequence. The rotation is computed in
fp32. Positions past the end of cos/sin read cos = 1, sin = 0 (identity); the functional API
rejects such inputs where it can check them cheaply. The backward is the same kernel with the
sign of sin flipped (the rotation's transpose is its inverse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.launch import (
    LaunchPlan,
    cdiv,
    device_guard,
    next_power_of_2,
)
from flash_attn.ops.plans import PlanCache, call_signature


@triton.jit
def _rotary_kernel(
    X,  # (B, S, H, D) or (total, H, D): strides stride_xb (0 when varlen), stride_xm, stride_xh
    Out,  # same shape as X; may be X itself (in place)
    Cos,
    Sin,  # (seqlen_ro, rotary_dim // 2) contiguous
    SeqlenOffsets,  # (B,) integer, read when IS_OFFSETS_TENSOR
    CuSeqlens,  # (B + 1,) int32, read when IS_VARLEN
    stride_xb,
    stride_xm,
    stride_xh,
    stride_ob,
    stride_om,
    stride_oh,
    seqlen,
    seqlen_offset,
    seqlen_ro,
    rotary_dim_half,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    IS_OFFSETS_TENSOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    if IS_VARLEN:
        start = tl.load(CuSeqlens + batch).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + batch + 1) - start).to(tl.int32)
        X += start * stride_xm
        Out += start * stride_om
    else:
        X += batch.to(tl.int64) * stride_xb
        Out += batch.to(tl.int64) * stride_ob
    X += head * stride_xh
    Out += head * stride_oh
    if IS_OFFSETS_TENSOR:
        seqlen_offset = tl.load(SeqlenOffsets + batch)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    pos = rows + seqlen_offset
    in_k = offs_k < rotary_dim_half
    cs_mask = (rows < seqlen)[:, None] & (pos < seqlen_ro)[:, None] & in_k[None, :]
    cs_offs = pos[:, None] * rotary_dim_half + offs_k[None, :]
    cos = tl.load(Cos + cs_offs, mask=cs_mask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + cs_offs, mask=cs_mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin

    # Column offsets of the two halves of each rotated pair.
    if INTERLEAVED:
        offs_0 = 2 * offs_k
        offs_1 = 2 * offs_k + 1
    else:
        offs_0 = offs_k
        offs_1 = offs_k + rotary_dim_half
    mask = (rows < seqlen)[:, None] & in_k[None, :]
    x_rows = X + rows[:, None].to(tl.int64) * stride_xm
    x0 = tl.load(x_rows + offs_0[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_rows + offs_1[None, :], mask=mask, other=0.0).to(tl.float32)
    o0 = x0 * cos - x1 * sin
    o1 = x0 * sin + x1 * cos
    o_rows = Out + rows[:, None].to(tl.int64) * stride_om
    tl.store(o_rows + offs_0[None, :], o0.to(Out.dtype.element_ty), mask=mask)
    tl.store(o_rows + offs_1[None, :], o1.to(Out.dtype.element_ty), mask=mask)


def _contiguous_strides(shape) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


_TENSORS = ("X", "Out", "Cos", "Sin", "SeqlenOffsets", "CuSeqlens")


class RotaryLaunch:
    """The rotation at one call signature (shapes, strides, dtypes, options): built from the
    first call's tensors (their metadata only), then called with each call's tensors.

    Args (construction; the call takes the five tensors, None where absent):
        x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens;
            any strides: read in place where its last stride is 1, else copied contiguous.
        cos, sin: (seqlen_rotary, rotary_dim // 2) (copied contiguous where they are not).
        seqlen_offsets: (batch,) integer tensor on x's device, or None for ``seqlen_offset``.
        cu_seqlens: (batch + 1,) int32, or None.
        seqlen_offset: the int offset of every sequence (without seqlen_offsets).
        max_seqlen: the longest sequence with cu_seqlens (else x.shape[1] is used).
        interleaved: GPT-J pairs (2i, 2i + 1) instead of GPT-NeoX halves.
        inplace: write into x (and return it); x must then have a unit last stride.
        conjugate: rotate by -angle (the backward).
    Call returns out: x's shape and dtype (x itself in place, else contiguous): the first
    rotary_dim features of each head rotated, the rest copied.
    """

    def __init__(
        self,
        x,
        cos,
        sin,
        seqlen_offsets,
        cu_seqlens,
        *,
        seqlen_offset: int = 0,
        max_seqlen: int | None = None,
        interleaved: bool = False,
        inplace: bool = False,
        conjugate: bool = False,
    ):
        self.copy_x = x.stride(-1) != 1
        if self.copy_x and inplace:
            raise ValueError("inplace rotary needs x with a unit last stride")
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.inplace = inplace
        x_strides = _contiguous_strides(x.shape) if self.copy_x else x.stride()
        out_strides = x_strides if inplace else _contiguous_strides(x.shape)
        is_varlen = cu_seqlens is not None
        if is_varlen:
            batch, (_, nheads, headdim), seqlen = cu_seqlens.shape[0] - 1, x.shape, max_seqlen
            x_strides, out_strides = (0, *x_strides[:2]), (0, *out_strides[:2])
        else:
            batch, seqlen, nheads, headdim = x.shape
        seqlen_ro, rotary_dim_half = cos.shape
        self.copy_tables = not (cos.is_contiguous() and sin.is_contiguous())
        # Features past rotary_dim are copied by the host (out of place).
        self.tail = 2 * rotary_dim_half if 2 * rotary_dim_half < headdim and not inplace else 0
        self.empty = x.numel() == 0 or seqlen == 0
        # The interpreter runs programs one after another in NumPy: few, large blocks are fastest.
        block_m = 64 if interpreter_enabled() else (8 if rotary_dim_half > 64 else 16)
        block_m = min(block_m, max(next_power_of_2(seqlen), 1))
        self.launch = LaunchPlan(
            _rotary_kernel,
            (cdiv(seqlen, block_m), nheads, batch),
            _TENSORS,
            stride_xb=x_strides[0],
            stride_xm=x_strides[1],
            stride_xh=x_strides[2],
            stride_ob=out_strides[0],
            stride_om=out_strides[1],
            stride_oh=out_strides[2],
            seqlen=seqlen,
            seqlen_offset=0 if seqlen_offsets is not None else seqlen_offset,
            seqlen_ro=seqlen_ro,
            rotary_dim_half=rotary_dim_half,
            INTERLEAVED=interleaved,
            CONJUGATE=conjugate,
            IS_VARLEN=is_varlen,
            IS_OFFSETS_TENSOR=seqlen_offsets is not None,
            BLOCK_M=block_m,
            BLOCK_K=max(next_power_of_2(rotary_dim_half), 2),
            num_warps=4 if rotary_dim_half * block_m >= 1024 else 2,
        )

    def __call__(self, x, cos, sin, seqlen_offsets, cu_seqlens):
        if self.copy_x:
            x = x.contiguous()
        if self.inplace:
            out = x
        else:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            if self.tail:
                out[..., self.tail :].copy_(x[..., self.tail :])
        if self.empty:
            return out
        if self.copy_tables:
            cos, sin = cos.contiguous(), sin.contiguous()
        with device_guard(x):
            self.launch(
                x,
                out,
                cos,
                sin,
                seqlen_offsets if seqlen_offsets is not None else cos,  # unread placeholders
                cu_seqlens if cu_seqlens is not None else cos,
            )
        return out


_plans = PlanCache()  # the launches of rotary_fwd, per call signature


def rotary_fwd(
    x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace, conjugate
):
    """Launch the rotary kernel (a :class:`RotaryLaunch` kept per call signature). Inputs are
    assumed validated (see ``flash_attn.ops.rotary``).

    Args:
        x: (batch, seqlen, nheads, headdim), or (total_seqlen, nheads, headdim) with cu_seqlens
            (batch + 1,) int32 and max_seqlen.
        cos, sin: (seqlen_rotary, rotary_dim // 2).
        seqlen_offsets: int, or (batch,) integer tensor on x's device.
        inplace: write into x (and return it).
        conjugate: rotate by -angle (the backward).
    Returns:
        x's shape and dtype: the first rotary_dim features of each head rotated, the rest copied.
    """
    offsets = seqlen_offsets if isinstance(seqlen_offsets, torch.Tensor) else None
    offset = 0 if offsets is not None else seqlen_offsets
    tensors = (x, cos, sin, offsets, cu_seqlens)
    options = dict(
        seqlen_offset=offset,
        max_seqlen=max_seqlen,
        interleaved=interleaved,
        inplace=inplace,
        conjugate=conjugate,
    )
    key = call_signature(tensors, tuple(options.values()))
    plan = _plans.get(key) or _plans.keep(key, RotaryLaunch(*tensors, **options))
    return plan(*tensors)
