"""Utilities around the ops: benchmarking helpers (``flash_attn.utils.benchmark``)."""
