"""Use this package's kernels from other frameworks.

``flash_attn.integrations.transformers``: our attention as ``attn_implementation=
"flash_attn_triton"`` and :func:`~flash_attn.integrations.transformers.apply_fused_ops` for
loaded Hugging Face models. Importing this package imports no framework.
"""
