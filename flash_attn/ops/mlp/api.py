"""Fused linear + activation and gated linear: the functional API and backend dispatch (the
custom ops over the Triton kernels are in ``function.py``, the modules in
``flash_attn.modules.mlp``).

``linear_activation(x, W, b, "gelu_approx")`` is ``F.gelu(F.linear(x, W, b), approximate="tanh")``
with the activation applied in the matmul's epilogue; ``gated_linear(x, W, b, "silu")`` is SwiGLU
(``up * silu(gate)`` with ``[up, gate] = F.linear(x, W, b).chunk(2, -1)``) in one kernel.
``fused_mlp`` follows either with the second linear layer (a plain matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.mlp.function import LinearActFunction, LinearActLaunches, linear_act_fwd_op
from flash_attn.ops.mlp.reference import ACTIVATION_FNS, gated_linear_ref, linear_activation_ref
from flash_attn.ops.plans import PlanCache, call_signature

ACTIVATIONS = tuple(ACTIVATION_FNS)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, weight, bias, activation, gated):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must be (..., in_features) with in_features = weight.shape[1] = {weight.shape[1]}, "
            f"got x {tuple(x.shape)}"
        )
    if gated and weight.shape[0] % 2:
        raise ValueError(
            f"gated weight must be (2 * hidden, in_features) = [W_up; W_gate], got an odd "
            f"{weight.shape[0]} rows"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"x, weight and bias must share a dtype, got x {x.dtype}, weight {weight.dtype}"
            + ("" if bias is None else f", bias {bias.dtype}")
        )
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"weight and bias must be on x's device {x.device}")


def _autocast(x, weight, bias):
    """Under autocast, compute in its dtype as nn.Linear does (custom ops do not autocast)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


class _LinearActPlan:
    """What one call signature of :func:`_linear_act` resolved to (checked on its first call):
    the backend and, for Triton, the launches, built by the first eager call that needs them
    (with gradients: :class:`LinearActLaunches`; without: a forward storing nothing else)."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        self.launches = self.forward = None


_plans = PlanCache()  # per call signature of _linear_act


def _linear_act(x, weight, bias, activation, gated, backend):
    x, weight, bias = _autocast(x, weight, bias)
    key = call_signature((x, weight, bias), (activation, gated, backend))
    plan = _plans.get(key)
    if plan is None:
        _check(x, weight, bias, activation, gated)
        resolved = resolve_backend(backend, x.device, x.dtype)
        if resolved == "triton" and x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"x must be one of {KERNEL_DTYPES} for backend='triton', got {x.dtype}")
        plan = _plans.keep(key, _LinearActPlan(resolved == "triton"))
    if not plan.use_triton:
        ref = gated_linear_ref if gated else linear_activation_ref
        return ref(x, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if torch.compiler.is_compiling():
        return linear_act_fwd_op(x, weight, bias, activation, gated, needs_grad)[0]
    if needs_grad:
        if plan.launches is None:
            plan.launches = LinearActLaunches(x, weight, bias, activation=activation, gated=gated)
        return LinearActFunction.apply(x, weight, bias, plan.launches)
    if plan.forward is None:
        from flash_attn.ops.mlp.triton.kernels import LinearActForward

        plan.forward = LinearActForward(
            x, weight, bias, activation=activation, gated=gated, store_pre=False
        )
    return plan.forward(x, weight, bias)[0]


def linear_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "gelu_approx",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """act(x @ weight.T + bias) with the activation fused into the matmul epilogue.

    Args:
        x: (..., in_features) fp32/fp16/bf16 (fp64 on the torch backend).
        weight: (out_features, in_features), ``nn.Linear`` layout, x's dtype.
        bias: optional (out_features,).
        activation: "gelu", "gelu_approx" (tanh), "relu", "sqrelu" (relu**2), "silu", "sigmoid".
        backend: None/"auto", "triton" or "torch" (see ``flash_attn.ops.backend``).
    Returns:
        (..., out_features) in x's dtype.
    Raises:
        ValueError: unknown activation, shapes that do not line up, devices that differ.
        TypeError: non-float or mismatched dtypes.
    """
    return _linear_act(x, weight, bias, activation, False, backend)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """up * act(gate) with [up, gate] = (x @ weight.T + bias).chunk(2, -1), in one kernel.

    Args:
        x: (..., in_features).
        weight: (2 * hidden, in_features) = [W_up; W_gate] (the official GatedMlp's fc1).
        bias: optional (2 * hidden,).
        activation: "silu" (SwiGLU), "gelu" / "gelu_approx" (GeGLU), "sigmoid" (GLU), "relu",
            "sqrelu".
    Returns:
        (..., hidden) in x's dtype.
    Raises:
        As :func:`linear_activation`; also ValueError for an odd number of weight rows.
    """
    return _linear_act(x, weight, bias, activation, True, backend)


def fused_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str = "gelu_approx",
    gated: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """fc2(act(fc1(x))), or fc2(gated_linear(x)) when gated.

    Args:
        x: (..., in_features).
        fc1_weight: (hidden, in_features), or (2 * hidden, in_features) when gated.
        fc2_weight: (out_features, hidden); biases optional, nn.Linear layouts.
    Returns:
        (..., out_features) in x's dtype.
    """
    n_hidden = fc1_weight.shape[0] // 2 if gated else fc1_weight.shape[0]
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != n_hidden:
        raise ValueError(
            f"fc2_weight must be (out_features, {n_hidden}), got {tuple(fc2_weight.shape)}"
        )
    hidden = _linear_act(x, fc1_weight, fc1_bias, activation, gated, backend)
    return F.linear(hidden, fc2_weight, fc2_bias)
