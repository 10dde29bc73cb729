"""Text sources, tokenizers, the token cache and the datamodule."""

from training.data.datamodule import GPTDataModule, ResumableWindowSampler, WindowDataset
from training.data.tokenizer import TextTokenizer, build_tokenizer

__all__ = [
    "GPTDataModule",
    "ResumableWindowSampler",
    "TextTokenizer",
    "WindowDataset",
    "build_tokenizer",
]
