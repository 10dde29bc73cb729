"""What a finetune reads: one local text file, and tokenizers that a Hugging Face folder holds."""

from __future__ import annotations

import pytest

from training.data.sources import load_text_dataset
from training.data.tokenizer import TextTokenizer, build_tokenizer

transformers = pytest.importorskip("transformers")


def _files_source(path, val_fraction=0.1) -> dict:
    return {"kind": "files", "data_files": str(path), "val_fraction": val_fraction}


def test_one_text_file_is_split_at_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"paragraph {i}\nsecond line" for i in range(20)))
    splits, _, _ = load_text_dataset(_files_source(path), tmp_path / "cache")
    assert (len(splits["train"]), len(splits["validation"])) == (18, 2)
    assert all(t.startswith("paragraph") for t in splits["train"]["text"])


def test_one_document_holds_out_its_last_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    splits, _, _ = load_text_dataset(_files_source(path), tmp_path / "cache")
    train, validation = splits["train"]["text"][0], splits["validation"]["text"][0]
    assert train + validation == path.read_text()
    assert validation.startswith("line 9") and len(validation) < len(train) / 5
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    with pytest.raises(ValueError, match="data.source.val_fraction"):
        load_text_dataset(_files_source(tiny, val_fraction=0.01), tmp_path / "cache")


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_trained_tokenizers_become_transformers_tokenizers(kind, tmp_path):
    """The quickstart's tokenizers, saved as transformers tokenizers, reopen with the same ids
    and <|endoftext|> as bos, eos and pad."""
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld " * 20]
    tokenizer = build_tokenizer(
        kind, vocab_size=300, cache_dir=tmp_path, training_texts=lambda: texts
    )
    tokenizer.to_transformers().save_pretrained(tmp_path / "hf")
    reopened = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts:
        assert reopened(text).input_ids == tokenizer.encode(text)
    special = {reopened.bos_token_id, reopened.eos_token_id, reopened.pad_token_id}
    assert special == {tokenizer.eos_id}
    assert len(reopened) == tokenizer.vocab_size


def test_pretrained_folder_ends_documents_with_its_eos(tmp_path):
    """A Llama-style folder's tokenizer (eos </s>, no <|endoftext|>) is accepted."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(tmp_path)
    tokenizer = build_tokenizer("pretrained", str(tmp_path))
    assert isinstance(tokenizer, TextTokenizer) and tokenizer.eos_id == 2
    assert tokenizer.encode_batch(["a b"]) == [[3, 4, 2]]
    assert tokenizer.to_transformers().eos_token == "</s>"
