"""``flash_attn.losses.cross_entropy`` of flash-attn 2.x: ``CrossEntropyLoss`` with the
official constructor. Nothing in the library imports this module: it exists for code written
for flash-attn 2.x.
"""

from flash_attn.modules.losses import CrossEntropyLoss2x as CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
