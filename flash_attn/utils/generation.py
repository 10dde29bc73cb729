"""``flash_attn.utils.generation`` of flash-attn 2.x (``InferenceParams``, the KV-cache state
that ``MHA`` reads), and the decoding helpers beside it. Nothing in the library imports this
module: decoding lives in ``flash_attn.models.generation``.
"""

from flash_attn.models.generation import InferenceParams, check_sampling, generate, sample

__all__ = ["InferenceParams", "check_sampling", "generate", "sample"]
