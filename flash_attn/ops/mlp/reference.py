"""Linear + activation, gated linear and MLP in plain PyTorch: CPU path and test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> elementwise function; the names are those of the official flash-attn FusedMLP
# ("gelu_approx" is the tanh approximation, "sqrelu" is relu(x)**2).
ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_approx": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "sqrelu": lambda x: F.relu(x).square(),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def linear_activation_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "gelu_approx",
) -> torch.Tensor:
    """act(x @ weight.T + bias): x (..., in_features), weight (out, in) -> (..., out)."""
    return ACTIVATION_FNS[activation](F.linear(x, weight, bias))


def gated_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """up * act(gate) where [up, gate] = x @ weight.T + bias split in two along the last dim.

    x (..., in_features), weight (2 * hidden, in_features) = [W_up; W_gate] -> (..., hidden).
    activation "silu" is SwiGLU, "gelu" GeGLU, "sigmoid" GLU.
    """
    up, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return up * ACTIVATION_FNS[activation](gate)


def mlp_ref(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str = "gelu_approx",
    gated: bool = False,
) -> torch.Tensor:
    """fc2(act(fc1(x))), or fc2(gated_linear(x)) when gated; nn.Linear weight layouts."""
    first = gated_linear_ref if gated else linear_activation_ref
    return F.linear(first(x, fc1_weight, fc1_bias, activation), fc2_weight, fc2_bias)
