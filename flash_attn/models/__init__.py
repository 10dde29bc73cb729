"""GPT models and Hugging Face checkpoint converters (one file per family)."""

from flash_attn.models.gpt import CausalLMOutput, GPTConfig, GPTLMHeadModel, GPTModel

__all__ = ["CausalLMOutput", "GPTConfig", "GPTLMHeadModel", "GPTModel"]
