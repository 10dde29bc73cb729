"""Losses at the import paths of flash-attn 2.x (``flash_attn.losses.cross_entropy``)."""
