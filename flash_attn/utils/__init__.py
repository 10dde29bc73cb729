"""Argument checks shared by the ops, modules, models and the training settings (``checks``),
and flash-attn 2.x's ``flash_attn.utils.generation`` import path."""
