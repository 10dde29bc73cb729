"""``flash_attn.ops.triton.rotary`` of flash-attn 2.x: ``apply_rotary`` with the official
arguments (``backend=`` is our keyword-only extension). Nothing in the library imports this
module: it exists for code written for flash-attn 2.x.
"""

from flash_attn.ops.rotary import apply_rotary

__all__ = ["apply_rotary"]
