"""Rotary position embedding in Triton, and its launcher.

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
from flash_attn.ops.launch import cdiv, device_guard, launch, next_power_of_2


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


def rotary_fwd(
    x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace, conjugate
):
    """Launch the rotary kernel. Inputs are assumed validated (see ``flash_attn.ops.rotary``).

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
    if x.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace rotary needs x with a unit last stride")
        x = x.contiguous()
    is_varlen = cu_seqlens is not None
    if is_varlen:
        batch = cu_seqlens.shape[0] - 1
        _, nheads, headdim = x.shape
        seqlen = max_seqlen
        stride_xb, (stride_xm, stride_xh) = 0, x.stride()[:2]
    else:
        batch, seqlen, nheads, headdim = x.shape
        stride_xb, stride_xm, stride_xh = x.stride()[:3]
    seqlen_ro, rotary_dim_half = cos.shape
    cos, sin = cos.contiguous(), sin.contiguous()

    if inplace:
        out = x
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if 2 * rotary_dim_half < headdim:
            out[..., 2 * rotary_dim_half :].copy_(x[..., 2 * rotary_dim_half :])
    if is_varlen:
        stride_ob, (stride_om, stride_oh) = 0, out.stride()[:2]
    else:
        stride_ob, stride_om, stride_oh = out.stride()[:3]
    if x.numel() == 0 or seqlen == 0:
        return out

    offsets_tensor = isinstance(seqlen_offsets, torch.Tensor)
    # The interpreter runs programs one after another in NumPy: few, large blocks are fastest.
    block_m = 64 if interpreter_enabled() else (8 if rotary_dim_half > 64 else 16)
    block_m = min(block_m, max(next_power_of_2(seqlen), 1))
    grid = (cdiv(seqlen, block_m), nheads, batch)
    with device_guard(x):
        launch(
            _rotary_kernel,
            grid,
            x,
            out,
            cos,
            sin,
            seqlen_offsets if offsets_tensor else cos,  # unread placeholders when absent
            cu_seqlens if is_varlen else cos,
            stride_xb,
            stride_xm,
            stride_xh,
            stride_ob,
            stride_om,
            stride_oh,
            seqlen,
            0 if offsets_tensor else seqlen_offsets,
            seqlen_ro,
            rotary_dim_half,
            INTERLEAVED=interleaved,
            CONJUGATE=conjugate,
            IS_VARLEN=is_varlen,
            IS_OFFSETS_TENSOR=offsets_tensor,
            BLOCK_M=block_m,
            BLOCK_K=max(next_power_of_2(rotary_dim_half), 2),
            num_warps=4 if rotary_dim_half * block_m >= 1024 else 2,
        )
    return out
