"""Datamodule on local files it writes itself; token cache; resumable sharded sampler."""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import hydra
import numpy as np
import pytest
import torch
from training_testing import compose_config, make_documents, write_corpus

from training.data.datamodule import GPTDataModule, ResumableWindowSampler
from training.data.sources import quickstart_files
from training.data.token_cache import load_tokens
from training.data.tokenizer import EOS_TOKEN, build_tokenizer


def _datamodule(data_files, cache_dir, tokenizer=None, **kwargs) -> GPTDataModule:
    source = {"kind": "files", "data_files": data_files, "val_fraction": 0.25}
    return GPTDataModule(
        source,
        tokenizer or {"kind": "bytes"},
        seq_len=16,
        batch_size=4,
        cache_dir=str(cache_dir),
        seed=3,
        **kwargs,
    )


def _documents_in(tokens: np.ndarray, tokenizer) -> list[str]:
    text = tokenizer.decode(tokens.tolist())
    assert text.endswith(EOS_TOKEN)
    return text.split(EOS_TOKEN)[:-1]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.zst", "parquet"])
def test_every_format_round_trips(fmt, tmp_path):
    docs = make_documents(13, seed=1)
    paths = write_corpus(tmp_path / "data", docs, fmt)
    pattern = str(tmp_path / "data" / "*.txt") if fmt == "txt" else str(paths[0])
    dm = _datamodule(pattern, tmp_path / "cache", num_proc=2)  # two tokenising processes
    files = dm.build()
    train = load_tokens(files["train"])
    val = load_tokens(files["validation"])
    assert train.dtype == np.uint16
    got = _documents_in(train, dm.tokenizer) + _documents_in(val, dm.tokenizer)
    assert sorted(got) == sorted(docs)  # every document once, EOS after each
    assert len(train) + len(val) == sum(len(d.encode()) + 1 for d in docs)
    assert len(_documents_in(val, dm.tokenizer)) == round(13 * 0.25)


def test_cache_is_reused_and_keyed_by_tokenizer(tmp_path):
    paths = write_corpus(tmp_path / "data", make_documents(12), "jsonl")
    dm = _datamodule(str(paths[0]), tmp_path / "cache")
    first = dm.build()["train"]
    mtime = os.path.getmtime(first)
    again = _datamodule(str(paths[0]), tmp_path / "cache").build()["train"]
    assert again == first and os.path.getmtime(again) == mtime  # not rebuilt
    bpe = _datamodule(str(paths[0]), tmp_path / "cache", {"kind": "bpe", "vocab_size": 300})
    other = bpe.build()["train"]
    assert other.parent != first.parent  # another tokenizer, another cache entry
    assert bpe.tokenizer.vocab_size <= 300
    # the trained tokenizer is cached too: a new datamodule loads the same one
    bpe2 = _datamodule(str(paths[0]), tmp_path / "cache", {"kind": "bpe", "vocab_size": 300})
    bpe2.build()
    assert bpe2.tokenizer.fingerprint == bpe.tokenizer.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_sidecar"])
def test_damaged_cache_is_detected_and_rebuilt(damage, tmp_path):
    paths = write_corpus(tmp_path / "data", make_documents(12), "jsonl")
    path = _datamodule(str(paths[0]), tmp_path / "cache").build()["train"]
    expected = np.array(load_tokens(path))
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 6)
    elif damage == "flip_byte":
        with open(path, "r+b") as f:
            f.seek(101)
            byte = f.read(1)
            f.seek(101)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.remove(str(path) + ".json")
    assert load_tokens(path) is None
    rebuilt = _datamodule(str(paths[0]), tmp_path / "cache").build()["train"]
    assert rebuilt == path
    np.testing.assert_array_equal(np.array(load_tokens(path)), expected)


def test_bits_per_byte_counts_are_exact(tmp_path):
    docs = make_documents(10, seed=4)
    paths = write_corpus(tmp_path / "data", docs, "jsonl")
    dm = _datamodule(str(paths[0]), tmp_path / "cache", {"kind": "bpe", "vocab_size": 400})
    files = dm.build()
    tokens = np.concatenate([load_tokens(files["train"]), load_tokens(files["validation"])])
    lengths = dm.token_bytes().numpy()
    assert lengths[dm.tokenizer.eos_id] == 0
    assert int(lengths[tokens].sum()) == sum(len(d.encode()) for d in docs)


def test_unigram_entropy_matches_direct_count(tmp_path):
    paths = write_corpus(tmp_path / "data", make_documents(10), "jsonl")
    dm = _datamodule(str(paths[0]), tmp_path / "cache")
    tokens = np.array(load_tokens(dm.build()["train"]))
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    expected = -(p * np.log(p)).sum()
    got = dm.unigram_entropy()
    assert math.isclose(got["nats_per_token"], expected, rel_tol=1e-9)
    n_bytes = int((tokens != dm.tokenizer.eos_id).sum())  # bytes tokenizer: 1 byte per token
    assert math.isclose(got["bits_per_byte"], expected * len(tokens) / (math.log(2) * n_bytes))


def test_sampler_shards_cover_each_window_once():
    seq_len, n_tokens, world, batch = 7, 1000, 3, 4
    samplers = [
        ResumableWindowSampler(
            n_tokens, seq_len, seed=5, rank=r, world_size=world, batch_size=batch
        )
        for r in range(world)
    ]
    epochs = []
    for _ in range(2):
        starts = [list(s) for s in samplers]
        assert {len(x) for x in starts} == {len(samplers[0])}  # equal share per rank
        assert len(starts[0]) % batch == 0 and len(starts[0]) > (n_tokens // seq_len) // 3 - batch
        flat = sorted(x for shard in starts for x in shard)
        assert len(flat) == len(set(flat))  # no window twice
        assert all(b - a >= seq_len for a, b in zip(flat, flat[1:]))  # non-overlapping
        assert flat[-1] + seq_len + 1 <= n_tokens  # every window fits
        epochs.append(flat)
        for s in samplers:
            s.advance(len(s))  # the epoch is used up: the next iteration starts another
    assert [s.epoch for s in samplers] == [1, 1, 1]
    assert epochs[0] != epochs[1]


def test_sampler_resumes_at_the_next_window():
    full = ResumableWindowSampler(500, 5, seed=1, rank=1, world_size=2, batch_size=3)
    full.advance(len(full))
    list(full)  # epoch 1
    order = list(full)
    partial = ResumableWindowSampler(500, 5, seed=1, rank=1, world_size=2, batch_size=3)
    partial.advance(len(partial))
    list(partial)
    partial.advance(6)  # this rank trained on 6 windows of epoch 1 (all ranks: 12)
    state = json.loads(json.dumps(partial.state_dict()))  # survives a checkpoint
    resumed = ResumableWindowSampler(500, 5, seed=1, rank=1, world_size=2, batch_size=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and list(resumed) == order[6:]
    resumed.advance(len(resumed) - 6)
    assert len(list(resumed)) == len(full) and resumed.epoch == 2
    with pytest.raises(ValueError, match="windows"):
        ResumableWindowSampler(600, 5, seed=1).load_state_dict(state)


def test_datamodule_state_resumes_loader(tmp_path):
    paths = write_corpus(tmp_path / "data", make_documents(30), "jsonl")
    dm = _datamodule(str(paths[0]), tmp_path / "cache")
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    dm.on_train_batch_consumed(4 * 3)  # three batches of 4 trained on
    state = dm.state_dict()
    dm2 = _datamodule(str(paths[0]), tmp_path / "cache")
    dm2.load_state_dict(state)  # before setup, as Lightning may do
    dm2.setup("fit")
    rest = list(dm2.train_dataloader())
    assert len(rest) == len(batches) - 3
    for a, b in zip(rest, batches[3:]):
        torch.testing.assert_close(a, b)
    assert batches[0].shape == (4, 17) and batches[0].dtype == torch.int64


def test_quickstart_corpus_is_deterministic_and_capped():
    a = quickstart_files(200_000)
    assert a == quickstart_files(200_000)
    assert sum(p.stat().st_size for p in a) <= 200_000
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in a)
    assert a == sorted(a)


def test_missing_dataset_offline_says_what_to_do(tmp_path, monkeypatch):
    """The message's overrides compose on the experiment's config, and it names the hub
    tokenizer that would fail next."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    experiment = ["experiment=gpt2", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"]
    cfg = compose_config([*experiment, "data.source.name=no-such-org/no-such-dataset"])
    with pytest.raises(RuntimeError) as info:
        hydra.utils.instantiate(cfg.data).build()
    message = str(info.value)
    assert "no-such-org/no-such-dataset" in message and "HF_DATASETS_CACHE" in message
    assert "data.tokenizer.name=gpt2" in message and "data.tokenizer.name=/path/to" in message
    suggested = re.search(r"data\.source\.kind=files data\.source\.data_files=\S+", message)
    cfg = compose_config([*experiment, *shlex.split(suggested[0])])
    assert cfg.data.source.kind == "files" and cfg.data.tokenizer.name == "gpt2"


def test_missing_tokenizer_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="tokenizer.json") as info:
        build_tokenizer("pretrained", "no-such-org/no-such-tokenizer", cache_dir=tmp_path)
    assert "data.tokenizer.name" in str(info.value)


def test_mistyped_tokenizer_path_is_named(tmp_path, monkeypatch):
    """A name that can only be a path, or a hub-shaped one the offline hub lacks: the error
    says that no such folder or file is here (not "Repo id must be in the form ...")."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("./no_such_tokenizer", "runs/../no_such/tokenizer.json"):
        with pytest.raises(FileNotFoundError, match="data.tokenizer.name=.*no tokenizer folder"):
            build_tokenizer("pretrained", name, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match=f"nothing at {tmp_path / 'no_such_dir' / 'tok'}"):
        build_tokenizer("pretrained", "no_such_dir/tok", cache_dir=tmp_path)


def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


UNREADABLE_FILES = [  # (file name, content, what the error says is wrong)
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n", "holds only whitespace"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not UTF-8 text"),
    ("empty.jsonl", b"", "is empty"),
    ("malformed.jsonl", b'{"text": "a"}\n{"text": "b"\n', "line 2 is not JSON"),
    ("lists.jsonl", b"[1, 2]\n[3]\n", "line 1 holds a JSON list, not an object"),
    ("binary.jsonl", b"\xff\xfe\x00\x01" * 100, "is not UTF-8 text"),
    ("malformed.jsonl.zst", _zst(b'{"text": "a"}\nnot json\n'), "line 2 is not JSON"),
    ("fake.parquet", b"not a parquet file", "is not a parquet file"),
]


@pytest.mark.parametrize(
    "name, content, problem", UNREADABLE_FILES, ids=[c[0] for c in UNREADABLE_FILES]
)
def test_unreadable_file_is_named_with_what_was_expected(name, content, problem, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        _datamodule(str(path), tmp_path / "cache").build()
    message = str(info.value)
    assert message.startswith(f"data.source.data_files: {path} {problem}")
    expected = {
        ".txt": "; expected UTF-8 text",
        ".jsonl": "; expected JSON lines: one JSON object per line, with a string field 'text'",
        ".parquet": "; expected a parquet file with a string column 'text'",
    }
    assert expected[path.suffixes[0]] in message


def test_bad_inputs_name_the_setting(tmp_path):
    paths = write_corpus(tmp_path / "data", make_documents(8), "jsonl")
    small_val = _datamodule(str(paths[0]), tmp_path / "cache")
    small_val.source["val_fraction"] = 0.01  # one short document: not one batch of windows
    small_val.batch_size = 64
    with pytest.raises(ValueError, match="val_fraction"):
        small_val.setup("fit")
    with pytest.raises(ValueError, match="data.source.kind"):
        GPTDataModule({"kind": "ftp"}, {"kind": "bytes"}, cache_dir=str(tmp_path)).build()
    with pytest.raises(FileNotFoundError, match="data_files"):
        _datamodule(str(tmp_path / "missing*.jsonl"), tmp_path / "cache").build()
    with pytest.raises(ValueError, match="tokenizer kind"):
        build_tokenizer("wordpiece")
