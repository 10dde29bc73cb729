"""Fused cross-entropy (label smoothing, logit scale, z-loss, vocabulary parallelism): the
functional API, its autograd, the Triton kernels (``triton/``) and the plain-PyTorch reference.

    api.py          cross_entropy_loss: checks, picks the backend; the checks that
                    linear_cross_entropy shares; flash-attn 2.x's per-row cross_entropy_loss_2x
    function.py     autograd: eager, CrossEntropyFunction over launches kept per call
                    signature; the custom ops flash_attn::cross_entropy_fwd / _bwd /
                    _bwd_inplace (fake implementations, autograd formula); the
                    vocabulary-parallel Function
    reference.py    the math in plain PyTorch: torch backend beyond F.cross_entropy, oracle
    triton/         kernels.py: the forward and backward kernels and their launchers

The modules (``CrossEntropyLoss``) are in ``flash_attn.modules.losses``.
"""

from flash_attn.ops.cross_entropy.api import (
    KERNEL_DTYPES,
    check_cross_entropy_inputs,
    check_labels_in_range,
    check_reduction,
    cross_entropy_loss,
    cross_entropy_loss_2x,
)
from flash_attn.ops.cross_entropy.function import uses_precomputed_lse

__all__ = [
    "KERNEL_DTYPES",
    "check_cross_entropy_inputs",
    "check_labels_in_range",
    "check_reduction",
    "cross_entropy_loss",
    "cross_entropy_loss_2x",
    "uses_precomputed_lse",
]


def __getattr__(name: str):
    # The modules used to live here; they are in flash_attn.modules.losses, imported on first
    # use so that this package imports nothing above it.
    if name in ("CrossEntropyLoss", "CrossEntropyOptions"):
        from flash_attn.modules import losses

        return getattr(losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
