"""LM head + cross-entropy in chunks, without the (tokens, vocab) logits: the functional API,
its autograd Function and the plain-PyTorch reference. It has no kernels of its own: on the
triton backend each chunk goes through the fused cross-entropy's kernels.

    api.py          linear_cross_entropy: checks, picks the backend and the chunk size
    function.py     the chunked pass and LinearCrossEntropyFunction
    reference.py    the math in plain PyTorch (materialises the logits): test oracle

The module (``LinearCrossEntropyLoss``) is in ``flash_attn.modules.losses``.
"""

from flash_attn.ops.linear_cross_entropy.api import default_chunk_size, linear_cross_entropy
from flash_attn.ops.linear_cross_entropy.function import LinearCrossEntropyFunction

__all__ = ["LinearCrossEntropyFunction", "default_chunk_size", "linear_cross_entropy"]


def __getattr__(name: str):
    # The module used to live here; it is in flash_attn.modules.losses, imported on first use
    # so that this package imports nothing above it.
    if name == "LinearCrossEntropyLoss":
        from flash_attn.modules import losses

        return losses.LinearCrossEntropyLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
