"""Streaming documents: hub fallback to the parquet export, packing, sharding, exact resume."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from training_testing import (
    compose_config,
    losses_by_step,
    make_documents,
    step_checkpoint_overrides,
    write_corpus,
)

from training.data.datamodule import GPTDataModule
from training.data.packing import WindowPacker
from training.data.sources import PARQUET_EXPORT, load_hub_dataset
from training.data.streaming import StreamingWindows, document_texts
from training.train import train


# -- the hub as it is: loading scripts refused, parquet exports -----------------------------
def _hub_with_script(tmp_path, with_export: bool):
    """A local "hub dataset" folder holding a loading script, and optionally its parquet
    export (served for revision refs/convert/parquet) beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "owt"
    repo.mkdir()
    (repo / "owt.py").write_text("# a loading script, as Skylion007/openwebtext has\n")
    export = tmp_path / "owt-parquet-export"
    if with_export:
        (export / "plain_text" / "train").mkdir(parents=True)
        table = pa.table({"text": make_documents(6)})
        pq.write_table(table, export / "plain_text" / "train" / "0000.parquet")
    return str(repo), str(export)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset that serves revision refs/convert/parquet from the export folder."""
    import datasets

    real = datasets.load_dataset
    exports = {}

    def load_dataset(path, *args, revision=None, **kwargs):
        if revision == PARQUET_EXPORT:
            return real(exports[path], *args, **kwargs)
        return real(path, *args, revision=revision, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return exports


@pytest.mark.parametrize("streaming", [False, True])
def test_loading_script_falls_back_to_the_parquet_export(tmp_path, fake_hub, caplog, streaming):
    repo, export = _hub_with_script(tmp_path, with_export=True)
    fake_hub[repo] = export
    with caplog.at_level(logging.WARNING, logger="training.data.sources"):
        loaded = load_hub_dataset({"name": repo, "config_name": None}, streaming=streaming)
    texts = [row["text"] for row in loaded["train"]]
    assert texts == make_documents(6)
    notes = [r.getMessage() for r in caplog.records if PARQUET_EXPORT in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "loading script" in notes[0]


def test_failed_parquet_export_names_both_attempts(tmp_path, fake_hub):
    repo, export = _hub_with_script(tmp_path, with_export=False)
    fake_hub[repo] = export
    with pytest.raises(RuntimeError) as info:
        GPTDataModule(
            {"kind": "hub", "name": repo}, {"kind": "bytes"}, cache_dir=str(tmp_path / "cache")
        ).build()
    message = str(info.value)
    assert "loading script" in message and PARQUET_EXPORT in message
    assert "data.source.kind=files" in message


# -- packing -------------------------------------------------------------------------------
def test_packer_cuts_the_memmap_windows_and_splits_long_documents():
    docs = [np.arange(3), np.arange(100, 125), np.arange(200, 204)]  # 25 > one window
    packer = WindowPacker(seq_len=8)
    windows = [w for i, d in enumerate(docs) for w in packer.add(i, d)]
    stream = np.concatenate(docs)
    expected = [stream[k * 8 : k * 8 + 9] for k in range((len(stream) - 1) // 8)]
    assert len(windows) == len(expected) == 3
    for got, want in zip(windows, expected):
        np.testing.assert_array_equal(got, want)
    assert packer.next_start == (1, 21)  # the next window starts at token 21 of document 1


def test_empty_documents_are_skipped_and_non_text_names_the_setting():
    docs = [{"text": "a"}, {"text": ""}, {"text": "b"}]
    assert list(document_texts(docs, "text")) == ["a", "b"]
    with pytest.raises(TypeError, match="data.source.text_field='id'"):
        list(document_texts([{"id": 3}], "id"))
    with pytest.raises(ValueError, match="data.source.text_field='body'"):
        list(document_texts(docs, "body"))


# -- the datamodule ---------------------------------------------------------------------------
def _train_documents(n_docs: int) -> list[str]:
    """make_documents, the fourth one empty."""
    docs = make_documents(n_docs, seed=2)
    docs[3] = ""
    return docs


def _corpus(tmp_path, n_docs=40, fmt="jsonl", files=1):
    """{train: files, validation: file} of _train_documents."""
    docs = _train_documents(n_docs)
    folder = tmp_path / "data"
    train = []
    for i in range(files):
        train += write_corpus(folder / f"train{i}", docs[i::files], fmt)
    val = write_corpus(folder / "val", make_documents(12, seed=9), fmt)
    return {"train": [str(p) for p in train], "validation": [str(p) for p in val]}


def _dm(tmp_path, data_files, streaming, **kwargs) -> GPTDataModule:
    source = {"kind": "files", "data_files": data_files, "val_split": "validation"}
    kwargs = {"seq_len": 32, "batch_size": 2, "seed": 5, **kwargs}
    return GPTDataModule(
        source, {"kind": "bytes"}, cache_dir=str(tmp_path / "cache"), streaming=streaming, **kwargs
    )


def _batches(dm, count=None, split="train"):
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def _tokens(batch):
    return batch["tokens"] if isinstance(batch, dict) else batch


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_streaming_gives_the_memmap_batches(tmp_path, fmt):
    data_files = _corpus(tmp_path, fmt=fmt)
    memmap = _dm(tmp_path, data_files, streaming=False, shuffle=False, document_mask=True)
    stream = _dm(tmp_path, data_files, streaming=True, shuffle=False, document_mask=True)
    for dm in (memmap, stream):
        dm.setup("fit")
    assert stream.files == {}  # nothing written
    for split in ("train", "validation"):
        want, got = _batches(memmap, split=split), _batches(stream, len(memmap.train_sampler))
        got = got[: len(want)] if split == "train" else _batches(stream, split=split)
        assert len(got) == len(want) > 2
        for a, b in zip(want, got):
            torch.testing.assert_close(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["document_starts"], b["document_starts"])


def test_streams_split_documents_by_rank_and_worker(tmp_path):
    for files in (1, 4):  # every 4th document / whole files
        data_files = _corpus(tmp_path / str(files), files=files)
        dm = _dm(tmp_path / str(files), data_files, streaming=True)
        dm.build()
        texts = []
        for rank in range(2):
            for stream in range(2):
                slot = StreamingWindows(
                    dm.streams["train"],
                    "text",
                    dm.tokenizer,
                    32,
                    2,
                    rank=rank,
                    world_size=2,
                    streams=2,
                )
                texts.append(list(document_texts(slot._slot_documents(stream), "text")))
        everything = [t for t in _train_documents(40) if t]
        assert all(texts) and sorted(sum(texts, [])) == sorted(everything)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_with_the_next_batch(tmp_path, workers):
    data_files = _corpus(tmp_path, n_docs=5)  # one epoch of about 30 batches: resume wraps
    settings = dict(num_workers=workers, shuffle_buffer=2)  # blocks of 2 documents
    dm = _dm(tmp_path, data_files, streaming=True, **settings)
    dm.setup("fit")
    batches = _batches(dm, 60)
    for batch in batches[:37]:
        dm.on_train_batch_consumed(2, batch)
    state = json.loads(json.dumps(dm.state_dict()))  # survives a checkpoint
    resumed = _dm(tmp_path, data_files, streaming=True, **settings)
    resumed.load_state_dict(state)  # before setup, as Lightning may do
    resumed.setup("fit")
    rest = _batches(resumed, 23)
    for want, got in zip(batches[37:], rest):
        torch.testing.assert_close(want["tokens"], got["tokens"])
    assert len({b["stream_state"]["epoch"] for b in batches}) > 1  # resumed after a wrap
    train = dm.datasets["train"]
    assert not np.array_equal(train._order(5, 0, 0, 0), train._order(5, 1, 0, 0))  # new order


def test_stream_end_wraps_and_logs(tmp_path, caplog):
    dm = _dm(tmp_path, _corpus(tmp_path, n_docs=4), streaming=True)
    dm.setup("fit")
    with caplog.at_level(logging.INFO, logger="training.data.streaming"):
        _batches(dm, 80)
    assert any("ran out of documents: epoch 1" in r.getMessage() for r in caplog.records)


def test_resume_needs_the_same_layout(tmp_path):
    data_files = _corpus(tmp_path)
    dm = _dm(tmp_path, data_files, streaming=True, num_workers=2)
    dm.setup("fit")
    state = dm.state_dict()
    other = _dm(tmp_path, data_files, streaming=True, num_workers=3)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="data.num_workers"):
        other.setup("fit")


# -- bad local files: named with what was expected, as the memmap path names them -----------
EXPECTED = {
    ".txt": "; expected UTF-8 text",
    ".jsonl": "; expected JSON lines: one JSON object per line, with a string field 'text'",
    ".parquet": "; expected a parquet file with a string column 'text'",
}


def _jsonl_with_a_broken_line(path, good_lines: int):
    lines = [json.dumps({"text": doc}) for doc in make_documents(good_lines, seed=4)]
    path.write_text("\n".join([*lines, '{"text": "cut short', *lines]) + "\n", encoding="utf-8")


def _unreadable(path, monkeypatch):
    """path as a file that cannot be opened (permissions do not stop root, this stand-in does)."""
    import builtins

    from training.data import file_checks

    path.write_text('{"text": "a"}\n')

    def refusing_open(name, *args, **kwargs):
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return builtins.open(name, *args, **kwargs)

    monkeypatch.setattr(file_checks, "open", refusing_open, raising=False)


BAD_FILES = {  # file name -> (writes it, what the error says is wrong)
    "fake.parquet": (lambda p, mp: p.write_bytes(b"not a parquet file"), "is not a parquet file"),
    "empty.jsonl": (lambda p, mp: p.write_bytes(b""), "is empty"),
    "broken.jsonl": (lambda p, mp: _jsonl_with_a_broken_line(p, 0), "line 1 is not JSON"),
    "binary.txt": (lambda p, mp: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"), "is not UTF-8 text"),
    "folder.jsonl": (lambda p, mp: p.mkdir(), "is a folder, not a file"),
    "locked.jsonl": (_unreadable, r"cannot be read \(Permission denied\)"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_local_file_is_named_before_streaming(tmp_path, monkeypatch, name):
    write, problem = BAD_FILES[name]
    path = tmp_path / name
    write(path, monkeypatch)
    dm = _dm(tmp_path, str(path), streaming=True)
    dm.source.pop("val_split")
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
        _batches(dm, 1)
    message = str(info.value)
    assert re.match(f"data.source.data_files: {re.escape(str(path))} {problem}", message)
    assert EXPECTED[path.suffixes[0]] in message


@pytest.mark.parametrize("workers", [0, 1])
def test_broken_line_met_while_streaming_names_the_file(tmp_path, workers):
    """A file the stream reaches only after training started: the error, raised in the
    loader's worker, names the file, its line and what was expected."""
    data_files = _corpus(tmp_path)
    broken = tmp_path / "data" / "later.jsonl"
    _jsonl_with_a_broken_line(broken, good_lines=30)
    data_files["train"].append(str(broken))
    dm = _dm(tmp_path, data_files, streaming=True, shuffle=False, num_workers=workers)
    dm.setup("fit")
    expected = f"data.source.data_files: {broken} line 31 is not JSON"
    with pytest.raises(
        ValueError, match=re.escape(expected) + ".*" + re.escape(EXPECTED[".jsonl"])
    ):
        _batches(dm)


def test_memmap_skips_empty_documents_and_checks_the_text_field(tmp_path):
    data_files = _corpus(tmp_path)
    dm = _dm(tmp_path, data_files, streaming=False)
    dm.setup("fit")
    train = np.array(dm.datasets["train"].tokens)
    assert not ((train[1:] == 256) & (train[:-1] == 256)).any()  # no bare end-of-text
    bad = GPTDataModule(
        {"kind": "files", "data_files": data_files, "text_field": "id", "val_split": "validation"},
        {"kind": "bytes"},
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(TypeError, match="data.source.text_field='id'"):
        bad.build()


def test_streaming_gpt3_run_resumes_with_the_same_losses(tmp_path, cache_dir):
    """experiment=gpt3-125m as it runs The Pile (streaming, here from local jsonl.zst, two
    loader workers) with document masking: resumed at step 3, steps 4-6 repeat the losses."""
    data_files = _corpus(tmp_path, n_docs=30, fmt="jsonl.zst")

    def overrides(run_dir, *extra):
        return [
            "experiment=gpt3-125m",
            "debug=tiny",
            "data.source.kind=files",
            f"+data.source.data_files={{train: {data_files['train'][0]}, "
            f"validation: {data_files['validation'][0]}}}",
            "data.tokenizer.kind=bytes",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={run_dir}",
            "logger=csv",
            "data.num_workers=2",
            "data.document_mask=true",
            "trainer.max_steps=6",
            "scheduler.total_steps=6",
            "trainer.val_check_interval=100",
            "sample.max_new_tokens=0",
            "optimizer.lr=1e-2",
            *extra,
        ]

    full = train(compose_config(overrides(tmp_path / "full", *step_checkpoint_overrides(3))))
    at_step_3 = tmp_path / "full" / "checkpoints" / "at-3.ckpt"
    resumed = train(compose_config(overrides(tmp_path / "resumed", f"ckpt_path={at_step_3}")))
    assert full["global_step"] == resumed["global_step"] == 6
    want, got = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "resumed")
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert not list(cache_dir.glob("tokens/*stream*"))  # no token cache written
