"""scripts/generate.py on a tiny GPT-2 folder with a word-level tokenizer (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "generate.py"
WORDS = ["<eos>"] + [f"w{i}" for i in range(63)]


def _load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_script_greedy_matches_hf(tmp_path, capsys):
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(WORDS),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)

    prompt = "w1 w2 w3"
    text = _load_script().main(
        ["--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--top-k", "1"]
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=0,
        pad_token_id=0,
    )
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert text.startswith(prompt) and len(text.split()) > 4  # something was generated
    assert "tokens/s" in capsys.readouterr().out


def test_prompt_and_new_tokens_must_fit_the_context():
    check_context = _load_script().check_context
    check_context(prompt_tokens=10, max_new_tokens=22, context=32)
    check_context(prompt_tokens=10, max_new_tokens=500, context=0)  # no known limit
    with pytest.raises(ValueError, match="--max-new-tokens 22 or less"):
        check_context(prompt_tokens=10, max_new_tokens=23, context=32)
