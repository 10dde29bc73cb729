"""``flash_attn.layers.rotary`` of flash-attn 2.x: the same names, arguments and defaults.
Nothing in the library imports this module: it exists for code written for flash-attn 2.x.
"""

from flash_attn.modules.rotary import RotaryEmbedding2x as RotaryEmbedding
from flash_attn.ops.rotary import (
    apply_rotary_emb,
    apply_rotary_emb_func,
    apply_rotary_emb_kv_,
    apply_rotary_emb_qkv_,
)
from flash_attn.ops.rotary.reference import apply_rotary_emb_torch, rotate_half

__all__ = [
    "RotaryEmbedding",
    "apply_rotary_emb",
    "apply_rotary_emb_func",
    "apply_rotary_emb_kv_",
    "apply_rotary_emb_qkv_",
    "apply_rotary_emb_torch",
    "rotate_half",
]
