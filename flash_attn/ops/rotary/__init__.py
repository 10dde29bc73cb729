"""Rotary position embedding: the functional API, its autograd, the Triton kernel (``triton/``)
and the plain-PyTorch reference.

    api.py          apply_rotary: checks, picks the backend, the torch backend, the in-place
                    autograd; flash-attn 2.x's apply_rotary_emb, apply_rotary_emb_qkv_,
                    apply_rotary_emb_kv_
    function.py     autograd: eager, RotaryFunction over launches kept per call signature;
                    the custom ops flash_attn::rotary (fake, autograd) and flash_attn::rotary_
                    (in place) over the kernel
    reference.py    the math in plain PyTorch: test oracle; flash-attn 2.x's
                    apply_rotary_emb_torch
    triton/         kernels.py: the rotation kernel and its launcher

The module (``RotaryEmbedding``) is in ``flash_attn.modules.rotary``.
"""

from flash_attn.ops.rotary.api import (
    apply_rotary,
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)

__all__ = [
    "apply_rotary",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
]
