"""The import paths of flash-attn 2.x's Triton ops (``layer_norm``, ``rotary``, ``cross_entropy``):
thin adapters over ``flash_attn.ops``. This package's own kernels are in ``flash_attn.ops.kernels``.
"""
