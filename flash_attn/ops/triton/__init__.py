"""The import paths of flash-attn 2.x's Triton ops (``layer_norm``, ``rotary``, ``cross_entropy``):
re-exports of ``flash_attn.ops`` and ``flash_attn.modules``, nothing else. This package's own
kernels are in the ``triton/`` folder of each op package (``flash_attn.ops.<op>.triton``).
"""
