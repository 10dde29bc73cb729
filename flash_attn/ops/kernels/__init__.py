"""Triton kernels and their host launchers (``<op>_fwd``, ``<op>_bwd``), nothing else.

Imported only by ``flash_attn.ops.<op>``, lazily, so ``import flash_attn`` works without Triton.
"""
