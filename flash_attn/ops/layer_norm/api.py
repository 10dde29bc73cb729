"""Fused dropout + residual add + LayerNorm / RMSNorm: functional API and backend dispatch.

    out = layer_norm_fn(x, weight, bias, residual, eps=1e-5, dropout_p=0.1)
    out, residual = layer_norm_fn(x, weight, bias, residual, prenorm=True)  # pre-norm blocks
    out, out1 = layer_norm_fn(x, w, b, residual, x1, w1, b1)              # parallel blocks

The signatures, defaults and return values are those of flash-attn 2.x
(``flash_attn.ops.triton.layer_norm`` re-exports them); ``backend=`` is our keyword-only
extension. The Triton path is the custom ops of ``function.py`` (``flash_attn::layer_norm_fwd``
and ``flash_attn::layer_norm_bwd``, with fake implementations and an autograd formula), so
``torch.compile`` traces through it. The torch path is native PyTorch (``F.layer_norm``,
``F.rms_norm``) around the reference's composition of the inputs. The modules ``LayerNorm`` and
``RMSNorm`` are in ``flash_attn.modules.norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.layer_norm.function import NormFunction, NormLaunches, layer_norm_fwd_op
from flash_attn.ops.layer_norm.reference import (
    draw_keep_masks,
    layer_norm_with,
    pack_outputs,
    residual_dtype_for,
)
from flash_attn.ops.plans import PlanCache, call_signature

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_plans = PlanCache()  # per call signature of layer_norm_fn


def _check_vector(name: str, t, hidden: int) -> None:
    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (hidden,)):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be None or have shape ({hidden},) (x's last dimension), got {got}"
        )


def _check_like(name: str, t, shape: tuple) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be None or have shape {shape}, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_inputs(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError("x must be a floating-point tensor of shape (..., hidden)")
    hidden = x.shape[-1]
    if hidden < 1:
        raise ValueError(f"x's last dimension (hidden) must be >= 1, got shape {tuple(x.shape)}")
    if weight is None:
        raise ValueError(f"weight must have shape ({hidden},), got None")
    for name, t in (("weight", weight), ("bias", bias), ("weight1", weight1), ("bias1", bias1)):
        _check_vector(name, t, hidden)
    for name, t in (("residual", residual), ("x1", x1)):
        _check_like(name, t, tuple(x.shape))
    _check_like("rowscale", rowscale, tuple(x.shape[:-1]))
    if rowscale is not None and x1 is not None:
        raise ValueError("rowscale cannot be combined with x1 (as in flash-attn 2.x)")
    if bias1 is not None and weight1 is None:
        raise ValueError("bias1 needs weight1 (the second output's weight)")
    named = (
        ("weight", weight),
        ("bias", bias),
        ("residual", residual),
        ("x1", x1),
        ("weight1", weight1),
        ("bias1", bias1),
        ("rowscale", rowscale),
    )
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _check_preallocated(out, residual_out, x) -> None:
    """out= and residual_out= must be float tensors of x's shape on x's device."""
    for name, t in (("out", out), ("residual_out", residual_out)):
        _check_like(name, t, tuple(x.shape))
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _native_norm(h: torch.Tensor, eps: float, is_rms_norm: bool, weight=None, bias=None):
    """xhat * weight + bias by one native call (RMSNorm: the bias added after it)."""
    hidden = (h.shape[-1],)
    if not is_rms_norm:
        return F.layer_norm(h, hidden, weight, bias, eps=eps)
    y = F.rms_norm(h, hidden, weight, eps=eps)
    return y + bias if bias is not None else y


def _layer_norm_torch(*args):
    """Native PyTorch normalisation; the masks come from torch's generator."""
    x, x1, dropout_p = args[0], args[4], args[8]
    keep, keep1 = draw_keep_masks(x, x1, dropout_p)
    return layer_norm_with(_native_norm, keep, keep1, *args)


class _NormPlan:
    """What one call signature of :func:`layer_norm_fn` resolved to (checked on its first call):
    the backend and, for Triton, the dtypes and the outputs the kernel stores."""

    def __init__(
        self,
        backend,
        x,
        residual,
        x1,
        weight1,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        return_dropout_mask,
        out_dtype,
    ):
        self.use_triton = backend == "triton"
        self.residual_dtype = residual_dtype_for(x, residual, residual_in_fp32)
        self.out_dtype = out_dtype or x.dtype
        # residual_out is needed by the caller (prenorm) or by the backward (h is not x).
        self.store = prenorm or any(t is not None for t in (residual, x1, rowscale))
        self.store = self.store or dropout_p > 0.0
        self.store_masks = return_dropout_mask and dropout_p > 0.0
        self.has_out1 = weight1 is not None
        self.has_mask1 = self.store_masks and x1 is not None
        self.launches = None  # the Triton launches, built by the first eager call


def _check_triton_dtypes(x, weight, bias, residual, x1, weight1, bias1) -> None:
    named = (
        ("x", x),
        ("weight", weight),
        ("bias", bias),
        ("residual", residual),
        ("x1", x1),
        ("weight1", weight1),
        ("bias1", bias1),
    )
    for name, t in named:
        if t is not None and t.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes fp16, bf16 or fp32 {name}, got {t.dtype}")


def _kernel_options(plan: _NormPlan, eps, dropout_p, is_rms_norm, zero_centered_weight) -> dict:
    """The forward's options after the tensors, in the order of ``flash_attn::layer_norm_fwd``
    (``NormForward``'s keywords)."""
    return dict(
        eps=float(eps),
        dropout_p=float(dropout_p),
        is_rms_norm=is_rms_norm,
        zero_centered_weight=zero_centered_weight,
        out_dtype=plan.out_dtype,
        residual_dtype=plan.residual_dtype,
        store_residual_out=plan.store,
        store_dropout_mask=plan.store_masks,
    )


def _layer_norm_triton(
    plan: _NormPlan,
    x,
    weight,
    bias,
    residual,
    x1,
    weight1,
    bias1,
    eps,
    dropout_p,
    rowscale,
    prenorm,
    zero_centered_weight,
    is_rms_norm,
    return_dropout_mask,
):
    # The seed comes from torch's generator, so torch.manual_seed makes dropout reproducible.
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    tensors = (x, weight, bias, residual, x1, weight1, bias1, rowscale, seed)
    if torch.compiler.is_compiling():
        options = _kernel_options(plan, eps, dropout_p, is_rms_norm, zero_centered_weight)
        y, y1, residual_out, _, _, keep, keep1 = layer_norm_fwd_op(
            *tensors, *options.values(), prenorm
        )
    else:
        launches = plan.launches
        if launches is None:
            options = _kernel_options(plan, eps, dropout_p, is_rms_norm, zero_centered_weight)
            launches = plan.launches = NormLaunches(*tensors, prenorm=prenorm, **options)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            y, y1, residual_out, keep, keep1 = NormFunction.apply(*tensors, launches)
        else:
            y, y1, residual_out, _, _, keep, keep1 = launches.forward(*tensors)
    return pack_outputs(
        y,
        y1 if plan.has_out1 else None,
        residual_out if prenorm else None,
        keep if plan.store_masks else None,
        keep1 if plan.has_mask1 else None,
        prenorm,
        return_dropout_mask,
    )


def _write_into(result, out, residual_out, has_out1: bool, prenorm: bool):
    """Copy out (and residual_out with prenorm) into the caller's preallocated tensors and
    return them in place of the fresh ones (``out=`` / ``residual_out=`` of flash-attn 2.x)."""
    values = list(result) if isinstance(result, tuple) else [result]
    if out is not None:
        values[0] = out.copy_(values[0])
    if residual_out is not None and prenorm:
        index = 2 if has_out1 else 1
        values[index] = residual_out.copy_(values[index])
    return tuple(values) if isinstance(result, tuple) else values[0]


def layer_norm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    x1: torch.Tensor | None = None,
    weight1: torch.Tensor | None = None,
    bias1: torch.Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    rowscale: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    zero_centered_weight: bool = False,
    is_rms_norm: bool = False,
    return_dropout_mask: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    *,
    backend: str | None = None,
):
    """LayerNorm (or RMSNorm) of h = dropout(x * rowscale) + dropout(x1) + residual, in one pass.

    Args:
        x: (..., hidden), fp16/bf16/fp32 (fp64 too on the torch backend).
        weight: (hidden,); bias: (hidden,) or None.
        residual: x's shape, or None.
        x1: x's shape, or None: a second input added to h (with its own dropout mask).
        weight1, bias1: (hidden,) or None: with weight1, a second output out1 = xhat * weight1
            + bias1 of the same normalised h (parallel attention + MLP blocks).
        eps: > 0, added to the variance (LayerNorm) or the mean square (RMSNorm).
        dropout_p: in [0, 1), applied to x and x1 before the adds (always: pass 0.0 in eval).
            The Triton path draws its masks in the kernel from a seed taken from torch's
            generator, so ``torch.manual_seed`` makes it reproducible.
        rowscale: x.shape[:-1] or None: each row of x is scaled before the dropout (stochastic
            depth). Not with x1.
        prenorm: also return residual_out = h, for the next block.
        residual_in_fp32: without a residual, residual_out is fp32 (with one, residual_out has
            the residual's dtype; else x's).
        zero_centered_weight: multiply by weight + 1 (and weight1 + 1): Gemma-style weights.
        is_rms_norm: RMSNorm instead of LayerNorm.
        return_dropout_mask: also return the bool keep masks of x and x1 (None where there is
            no dropout or no x1).
        out_dtype: dtype of out and out1 (default x's).
        out, residual_out: preallocated tensors (x's shape) to write out / residual_out into.
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"`` (see ``flash_attn.ops.backend``).
    Returns:
        out; then out1 when weight1 is given, residual_out when prenorm, and (dropout_mask,
        dropout_mask1) when return_dropout_mask, in that order, as one tuple.
    Raises:
        ValueError: shape or device mismatch (out and residual_out included), eps <= 0,
            dropout_p outside [0, 1), rowscale with x1, bias1 without weight1.
        TypeError: non-float inputs or out / residual_out, or fp64 on the Triton backend.
    """
    key = call_signature(
        (x, weight, bias, residual, x1, weight1, bias1, rowscale, out, residual_out),
        (
            eps,
            dropout_p,
            prenorm,
            residual_in_fp32,
            zero_centered_weight,
            is_rms_norm,
            return_dropout_mask,
            out_dtype,
            backend,
        ),
    )
    plan = _plans.get(key)
    if plan is None:
        _check_inputs(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale)
        _check_preallocated(out, residual_out, x)
        resolved = resolve_backend(backend, x.device, x.dtype)
        if resolved == "triton":
            _check_triton_dtypes(x, weight, bias, residual, x1, weight1, bias1)
        plan = _NormPlan(
            resolved,
            x,
            residual,
            x1,
            weight1,
            dropout_p,
            rowscale,
            prenorm,
            residual_in_fp32,
            return_dropout_mask,
            out_dtype,
        )
        plan = _plans.keep(key, plan)
    if plan.use_triton:
        result = _layer_norm_triton(
            plan,
            x,
            weight,
            bias,
            residual,
            x1,
            weight1,
            bias1,
            eps,
            dropout_p,
            rowscale,
            prenorm,
            zero_centered_weight,
            is_rms_norm,
            return_dropout_mask,
        )
    else:
        result = _layer_norm_torch(
            x,
            weight,
            bias,
            residual,
            x1,
            weight1,
            bias1,
            eps,
            dropout_p,
            rowscale,
            prenorm,
            residual_in_fp32,
            zero_centered_weight,
            is_rms_norm,
            return_dropout_mask,
            out_dtype,
        )
    if out is None and residual_out is None:
        return result
    return _write_into(result, out, residual_out, weight1 is not None, prenorm)


def rms_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    return_dropout_mask=False,
    out_dtype=None,
    out=None,
    residual_out=None,
    *,
    backend=None,
):
    """RMSNorm: :func:`layer_norm_fn` with ``is_rms_norm=True`` (same arguments otherwise).

    out = h / sqrt(mean(h ** 2) + eps) * weight (+ bias).
    """
    return layer_norm_fn(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        zero_centered_weight,
        True,
        return_dropout_mask,
        out_dtype,
        out,
        residual_out,
        backend=backend,
    )


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def layer_norm_linear_fn(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    is_rms_norm: bool = False,
    *,
    backend: str | None = None,
):
    """F.linear(layer_norm_fn(x, ...), linear_weight, linear_bias).

    Args:
        x, residual: (..., hidden); norm_weight, norm_bias: (hidden,) (bias may be None).
        linear_weight: (out_features, hidden); linear_bias: (out_features,) or None.
        eps, prenorm, residual_in_fp32, is_rms_norm, backend: as in :func:`layer_norm_fn`.
    Returns:
        (..., out_features), in the autocast dtype under autocast (else the normalised output's
        dtype, x's); with prenorm, (out, residual_out).
    """
    normed = layer_norm_fn(
        x,
        norm_weight,
        norm_bias,
        residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm,
        out_dtype=_autocast_dtype(x.device),
        backend=backend,
    )
    y, residual_out = normed if prenorm else (normed, None)
    weight = linear_weight.to(y.dtype)
    bias = linear_bias.to(y.dtype) if linear_bias is not None else None
    out = F.linear(y, weight, bias)
    return (out, residual_out) if prenorm else out
