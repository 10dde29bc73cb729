"""``flash_attn.ops.triton.cross_entropy`` of flash-attn 2.x: ``cross_entropy_loss`` with the
official arguments and per-row results. Nothing in the library imports this module: it exists
for code written for flash-attn 2.x.
"""

from flash_attn.ops.cross_entropy import cross_entropy_loss_2x as cross_entropy_loss

__all__ = ["cross_entropy_loss"]
