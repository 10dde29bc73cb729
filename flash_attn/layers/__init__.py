"""flash-attn 2.x layer import paths (``flash_attn.layers.rotary``) over this package's ops."""
