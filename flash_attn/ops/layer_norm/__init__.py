"""LayerNorm / RMSNorm fused with dropout and residual adds: the functional API, its autograd,
the Triton kernels (``triton/``) and the plain-PyTorch reference.

    api.py          layer_norm_fn, rms_norm_fn, layer_norm_linear_fn: checks, picks the backend;
                    the torch backend (native F.layer_norm / F.rms_norm)
    function.py     autograd: eager, NormFunction over launches kept per call signature;
                    under torch.compile, the custom ops flash_attn::layer_norm_fwd / layer_norm_bwd
    reference.py    the math in plain PyTorch: test oracle; helpers the torch backend shares
    triton/         kernels.py: the forward and backward kernels and their launchers

The modules (``LayerNorm``, ``RMSNorm``) are in ``flash_attn.modules.norm``.
"""

from flash_attn.ops.layer_norm.api import layer_norm_fn, layer_norm_linear_fn, rms_norm_fn

__all__ = ["layer_norm_fn", "layer_norm_linear_fn", "rms_norm_fn"]
