"""The end-of-run sample stays within the model's positions, which the exported hf/ folder
states as max_position_embeddings: transformers' generate can write what the run printed."""

from __future__ import annotations

import pytest
from training_testing import compose_config

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from training.train import sample_text


class IdTokenizer:
    """Text is space-separated token ids (a tokenizer whose counts are exact)."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    config = GPTConfig(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPTLMHeadModel(config).eval()


def test_sample_stops_at_the_models_positions(model):
    ids = IdTokenizer().encode(sample_text(model, IdTokenizer(), "1 2 3", max_new_tokens=50))
    assert len(ids) == 16 and ids[:3] == [1, 2, 3]


def test_a_long_prompt_keeps_its_last_tokens(model):
    prompt = " ".join(str(i) for i in range(1, 21))  # 20 tokens, 16 positions
    ids = IdTokenizer().encode(sample_text(model, IdTokenizer(), prompt, max_new_tokens=5))
    assert len(ids) == 16 and ids[:15] == list(range(6, 21))


def test_a_short_sample_is_not_padded(model):
    ids = IdTokenizer().encode(sample_text(model, IdTokenizer(), "1 2 3", max_new_tokens=4))
    assert len(ids) == 7


def test_quickstart_sample_fits_its_positions(tmp_path):
    """The quickstart's prompt (at most one byte-level BPE token per byte) and sample fit in
    the positions its hf/ folder declares (n_positions follows data.seq_len)."""
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    positions = cfg.model.config.n_positions
    assert positions == cfg.data.seq_len and cfg.data.tokenizer.kind == "bpe"
    assert len(cfg.sample.prompt.encode()) + cfg.sample.max_new_tokens <= positions
