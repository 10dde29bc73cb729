"""``flash_attn.ops.triton.layer_norm`` of flash-attn 2.x: the same names, arguments, defaults
and return values. Nothing in the library imports this module: it exists for code written for
flash-attn 2.x.
"""

from flash_attn.modules.norm import LayerNorm2x as LayerNorm
from flash_attn.modules.norm import RMSNorm2x as RMSNorm
from flash_attn.ops.layer_norm import layer_norm_fn, layer_norm_linear_fn, rms_norm_fn
from flash_attn.ops.layer_norm.reference import layer_norm_ref_2x as layer_norm_ref
from flash_attn.ops.layer_norm.reference import rms_norm_ref_2x as rms_norm_ref

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "layer_norm_fn",
    "layer_norm_linear_fn",
    "layer_norm_ref",
    "rms_norm_fn",
    "rms_norm_ref",
]
