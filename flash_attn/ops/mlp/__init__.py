"""Linear + activation with the activation in the matmul's epilogue, the gated variant (SwiGLU,
GeGLU) and the MLP: the functional API, its autograd, the Triton kernels (``triton/``) and the
plain-PyTorch reference.

    api.py          linear_activation, gated_linear, fused_mlp: checks, picks the backend
    function.py     autograd: eager, LinearActFunction over launches kept per call signature;
                    under torch.compile, the custom ops flash_attn::linear_act_fwd / linear_act_bwd
    reference.py    the math in plain PyTorch: torch backend and test oracle; ACTIVATION_FNS
    triton/         kernels.py: the matmul + activation kernel, the activation's backward

The modules (``Mlp``, ``FusedMLP``, ``GatedMlp``) are in ``flash_attn.modules.mlp``.
"""

from flash_attn.ops.mlp.api import (
    ACTIVATIONS,
    KERNEL_DTYPES,
    fused_mlp,
    gated_linear,
    linear_activation,
)

__all__ = ["ACTIVATIONS", "KERNEL_DTYPES", "fused_mlp", "gated_linear", "linear_activation"]
