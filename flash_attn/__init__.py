"""FlashAttention in Triton with a plain-PyTorch CPU path, and fused ops for GPT training."""

__version__ = "0.1.0"
