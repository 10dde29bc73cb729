"""MLP blocks with the first layer's activation fused into its matmul.

Parameters live in ``nn.Linear`` modules named ``fc1`` and ``fc2``, like the official flash-attn
``Mlp`` / ``FusedMLP`` / ``GatedMlp``, so their state dicts load into plain ``nn.Linear``
models and back. ``GatedMlp``'s fc1 produces ``[up, gate]`` stacked along its output.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from flash_attn.ops.mlp import ACTIVATIONS, fused_mlp
from flash_attn.utils.checks import check_backend, check_bool, check_choice, check_int

_SIZE = partial(check_int, minimum=1)
# FusedMLP argument -> check(name, value): the kind and range each argument must have.
_ARGUMENT_CHECKS = {
    "in_features": _SIZE,
    **dict.fromkeys(("hidden_features", "out_features"), partial(_SIZE, optional=True)),
    "activation": partial(check_choice, choices=ACTIVATIONS),
    **dict.fromkeys(("bias1", "bias2", "return_residual"), check_bool),
    "backend": check_backend,
}


class FusedMLP(nn.Module):
    """fc2(act(fc1(x))) with act computed in fc1's matmul epilogue.

    Args:
        in_features: size of x's last dimension.
        hidden_features: fc1's outputs; defaults to 4 * in_features.
        out_features: defaults to in_features.
        activation: "gelu_approx" (GPT-2), "gelu", "relu", "sqrelu", "silu", "sigmoid".
        bias1, bias2: biases of fc1 and fc2.
        return_residual: forward returns (out, x), for blocks that add the residual later.
        backend: passed to :func:`flash_attn.ops.mlp.fused_mlp`.
    forward: x (..., in_features) -> (..., out_features).
    """

    gated = False

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: str = "gelu_approx",
        bias1: bool = True,
        bias2: bool = True,
        return_residual: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, check in _ARGUMENT_CHECKS.items():
            check(name, locals()[name])
        hidden_features = hidden_features if hidden_features is not None else 4 * in_features
        out_features = out_features if out_features is not None else in_features
        fc1_out = 2 * hidden_features if self.gated else hidden_features
        factory = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_features, fc1_out, bias=bias1, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory)
        self.activation, self.return_residual, self.backend = activation, return_residual, backend

    def forward(self, x: torch.Tensor):
        out = fused_mlp(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.activation,
            self.gated,
            backend=self.backend,
        )
        return (out, x) if self.return_residual else out

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GatedMlp(FusedMLP):
    """fc2(up * act(gate)), [up, gate] = fc1(x): SwiGLU ("silu"), GeGLU ("gelu"), GLU ("sigmoid").

    Args:
        hidden_features: width of the gated product; defaults to 8/3 * in_features rounded up
            to a multiple of ``multiple_of`` (LLaMA's sizing). fc1 has 2 * hidden_features
            outputs: rows [0, hidden) are up, [hidden, 2 * hidden) the gate.
        Other arguments as :class:`FusedMLP`, with activation defaulting to "silu".
    forward: x (..., in_features) -> (..., out_features).
    """

    gated = True

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: str = "silu",
        bias1: bool = True,
        bias2: bool = True,
        multiple_of: int = 128,
        return_residual: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        check_int("multiple_of", multiple_of, minimum=1)
        if hidden_features is None:
            check_int("in_features", in_features, minimum=1)
            hidden_features = int(8 * in_features / 3)
            hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        super().__init__(
            in_features,
            hidden_features,
            out_features,
            activation,
            bias1,
            bias2,
            return_residual,
            backend,
            device,
            dtype,
        )


class Mlp(FusedMLP):
    """fc2(act(fc1(x))): :class:`FusedMLP` with the same parameter names and arguments, whose
    backend defaults to ``"torch"`` (plain ``F.linear`` and the activation, unfused).

    forward: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, *args, backend: str | None = "torch", **kwargs):
        super().__init__(*args, backend=backend, **kwargs)
