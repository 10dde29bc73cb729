"""Fused dropout + residual add + LayerNorm / RMSNorm: functional API and backend dispatch.

    out = layer_norm_fn(x, weight, bias, residual, eps, dropout_p)
    out, residual = layer_norm_fn(x, weight, bias, residual, prenorm=True)  # pre-norm blocks

The Triton path is registered as the custom ops ``flash_attn::layer_norm_fwd`` and
``flash_attn::layer_norm_bwd`` (with fake implementations and an autograd formula), so
``torch.compile`` traces through it. The torch path is native PyTorch (``F.layer_norm``,
``F.rms_norm``). The modules ``LayerNorm`` and ``RMSNorm`` are in ``flash_attn.modules.norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.reference.layer_norm import residual_dtype_for

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("flash_attn::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor], seed: Optional[torch.Tensor], eps: float, dropout_p: float,
    is_rms_norm: bool, residual_dtype: torch.dtype, store_residual_out: bool, prenorm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x, residual (M, N) -> y (M, N), residual_out (M, N) or (0,), mean (M,), rstd (M,)."""
    from flash_attn.ops.triton.layer_norm import layer_norm_fwd

    y, residual_out, mean, rstd = layer_norm_fwd(
        x,
        weight,
        bias,
        eps,
        residual,
        dropout_p,
        seed,
        is_rms_norm,
        residual_dtype,
        store_residual_out,
    )
    if residual_out is None:  # custom ops cannot return None
        residual_out = x.new_empty(0, dtype=residual_dtype)
    return y, residual_out, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(
    x,
    weight,
    bias,
    residual,
    seed,
    eps,
    dropout_p,
    is_rms_norm,
    residual_dtype,
    store_residual_out,
    prenorm,
):
    M = x.shape[0]
    residual_out = x.new_empty(x.shape if store_residual_out else (0,), dtype=residual_dtype)
    stats = x.new_empty((M,), dtype=torch.float32)
    return torch.empty_like(x), residual_out, stats, torch.empty_like(stats)


@torch.library.custom_op("flash_attn::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    is_rms_norm: bool,
    residual_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (M, N), dweight (N,), dbias (N,), dresidual (M, N) or (0,) without a residual."""
    from flash_attn.ops.triton.layer_norm import layer_norm_bwd

    dx, dweight, dbias, dresidual = layer_norm_bwd(
        dy, x, weight, mean, rstd, dresidual_out, dropout_p, seed, is_rms_norm, residual_dtype
    )
    if dresidual is None:
        dresidual = dy.new_empty(0)
    return dx, dweight, dbias, dresidual


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dresidual_out, seed, dropout_p, is_rms_norm, residual_dtype):
    dresidual = (
        dy.new_empty(dy.shape, dtype=residual_dtype)
        if residual_dtype is not None
        else dy.new_empty(0)
    )
    return torch.empty_like(dy), torch.empty_like(weight), torch.empty_like(weight), dresidual


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, seed, eps, dropout_p, is_rms_norm, _, store, prenorm = inputs
    _, residual_out, mean, rstd = output
    # The backward needs the normalised input: residual_out when it was written, else x.
    ctx.save_for_backward(residual_out if store else x, weight, mean, rstd, seed)
    ctx.has_bias = bias is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.dropout_p = dropout_p
    ctx.is_rms_norm = is_rms_norm
    ctx.prenorm = prenorm


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    x, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dweight, dbias, dresidual = _layer_norm_bwd_op(
        dy,
        x,
        weight,
        mean,
        rstd,
        dresidual_out if ctx.prenorm else None,
        seed,
        ctx.dropout_p,
        ctx.is_rms_norm,
        ctx.residual_dtype,
    )
    return (
        dx,
        dweight,
        dbias if ctx.has_bias else None,
        dresidual if ctx.residual_dtype is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, weight, bias, residual, eps, dropout_p):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError("x must be a floating-point tensor of shape (..., hidden)")
    hidden = x.shape[-1]
    if hidden < 1:
        raise ValueError(f"x's last dimension (hidden) must be >= 1, got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (hidden,):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape ({hidden},) (x's last dimension), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (hidden,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or have shape ({hidden},), got {got}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual
            raise ValueError(f"residual must be None or have x's shape {tuple(x.shape)}, got {got}")
        if not residual.is_floating_point():
            raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _layer_norm_torch(
    x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32, is_rms_norm
):
    """Native PyTorch: the same math as the reference, with F.dropout and F.layer_norm."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute_dtype)
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    if residual is not None:
        h = h + residual.to(compute_dtype)
    hidden = (x.shape[-1],)
    w = weight.to(compute_dtype)
    if is_rms_norm:
        y = F.rms_norm(h, hidden, w, eps)
        if bias is not None:
            y = y + bias.to(compute_dtype)
    else:
        y = F.layer_norm(h, hidden, w, bias.to(compute_dtype) if bias is not None else None, eps)
    y = y.to(x.dtype)
    if prenorm:
        return y, h.to(residual_dtype_for(x, residual, residual_in_fp32))
    return y


def _layer_norm_triton(
    x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32, is_rms_norm
):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes fp16, bf16 or fp32 {name}, got {t.dtype}")
    shape = x.shape
    hidden = shape[-1]
    residual_dtype = residual_dtype_for(x, residual, residual_in_fp32)
    # The seed comes from torch's generator, so torch.manual_seed makes dropout reproducible.
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    # residual_out is needed by the caller (prenorm) or by the backward (it is not x).
    store = prenorm or residual is not None or dropout_p > 0.0
    y, residual_out, _, _ = _layer_norm_fwd_op(
        x.reshape(-1, hidden),  # (..., N) -> (M, N)
        weight,
        bias,
        residual.reshape(-1, hidden) if residual is not None else None,
        seed,
        float(eps),
        float(dropout_p),
        is_rms_norm,
        residual_dtype,
        store,
        prenorm,
    )
    y = y.view(shape)
    return (y, residual_out.view(shape)) if prenorm else y


def layer_norm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
    *,
    backend: str | None = None,
):
    """LayerNorm (or RMSNorm) of dropout(x) + residual, in one pass.

    Args:
        x: (..., hidden), fp16/bf16/fp32 (fp64 too on the torch backend).
        weight: (hidden,); bias: (hidden,) or None.
        residual: x's shape, or None.
        eps: > 0, added to the variance (LayerNorm) or the mean square (RMSNorm).
        dropout_p: in [0, 1), applied to x before the residual add (always: pass 0.0 in eval).
            The Triton path draws its mask in the kernel from a seed taken from torch's
            generator, so ``torch.manual_seed`` makes it reproducible.
        prenorm: also return residual_out = dropout(x) + residual, for the next block.
        residual_in_fp32: residual_out is fp32 (else the residual's dtype, or x's).
        is_rms_norm: RMSNorm instead of LayerNorm.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"`` (see ``flash_attn.ops.backend``).
    Returns:
        out: x's shape and dtype; or (out, residual_out) when prenorm.
    Raises:
        ValueError: shape or device mismatch, eps <= 0, dropout_p outside [0, 1).
        TypeError: non-float inputs, or fp64 on the Triton backend.
    """
    _check_inputs(x, weight, bias, residual, eps, dropout_p)
    args = (x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32, is_rms_norm)
    if resolve_backend(backend, x.device) == "triton":
        return _layer_norm_triton(*args)
    return _layer_norm_torch(*args)


def rms_norm_fn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor | None = None, eps: float = 1e-6, dropout_p: float = 0.0,
    prenorm: bool = False, residual_in_fp32: bool = False,
    *, backend: str | None = None,
):  # fmt: skip
    """RMSNorm of dropout(x) + residual: :func:`layer_norm_fn` with ``is_rms_norm=True``.

    y = h / sqrt(mean(h ** 2) + eps) * weight (+ bias), h = dropout(x) + residual.
    """
    return layer_norm_fn(
        x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32,
        is_rms_norm=True, backend=backend,
    )  # fmt: skip
