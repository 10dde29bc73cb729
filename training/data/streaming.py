"""Documents streamed from the hub or local files, tokenized in the data-loader workers and
packed into windows; nothing is written to disk.

Every rank runs ``streams`` data-loader workers (one in the main process when
data.num_workers=0); stream j of rank r reads the documents of slot r * streams + j of
``datasets.distributed.split_dataset_by_node`` (whole files when their number is a multiple
of the slots, else every slots-th document), so no two slots read the same document. Each
batch says where its stream continues; the datamodule keeps the position of the last batch
trained on of every stream, and a resumed run starts each stream there.

Local files are checked before the stream opens as far as that needs no reading them through
(missing, unreadable, not parquet); a file found bad only as it is read (a broken JSON line)
stops the stream with an error naming it and what was expected, as the memmap path does.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from training.data.packing import WindowPacker, require_text, window_batch
from training.data.sources import files_builder_args, load_hub_dataset, raise_if_unreadable
from training.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_READ_BLOCK = 256  # documents read together when there is no shuffling
_ENCODE_BATCH = 64  # documents handed to the tokenizer at once


FileCheck = Callable[[Exception | None], None]


def open_streams(source: dict, cache_dir: str, val_documents: int):
    """(train, validation) ``datasets.IterableDataset`` of a hub or files source, a
    fingerprint of the source (it keys a BPE tokenizer trained on it), and the file checks of
    the two streams ({"train": check, "validation": check}, None for the hub): a check,
    called with the error that stopped reading a stream (or None: it had no documents),
    raises a ValueError naming the first of the stream's files that cannot be read.

    Without a validation split, the first val_documents documents of the training stream are
    held out. max_documents caps the training documents.
    """
    import datasets

    kind = source.get("kind")
    hf_cache = source.get("hf_cache_dir")
    text_field = source.get("text_field") or "text"
    checks: dict[str, FileCheck | None] = {}
    if kind == "hub":
        streams = load_hub_dataset(source, streaming=True, cache_dir=hf_cache)
        train_split = source.get("split") or "train"
        key = f"hub|{source.get('name')}|{source.get('config_name')}|{source.get('revision')}"
    elif kind == "files":
        builder, resolved, kwargs = files_builder_args(source)
        every_file = [f for fs in resolved.values() for f in fs]
        raise_if_unreadable(every_file, builder, text_field, read_through=False)
        checks = {
            split: partial(raise_if_unreadable, files, builder, text_field)
            for split, files in resolved.items()
        }
        try:  # the json builder reads the start of the first file for its columns
            streams = datasets.load_dataset(
                builder,
                data_files=resolved,
                streaming=True,
                cache_dir=hf_cache or os.path.join(cache_dir, "hf"),
                **kwargs,
            )
        except Exception as exc:  # StopIteration, ArrowInvalid ... name no file
            raise_if_unreadable(every_file, builder, text_field, exc)
            raise
        train_split = "train"
        key = "files|" + "|".join(
            f"{s}:{f}:{os.path.getsize(f)}:{os.path.getmtime(f)}"
            for s, fs in sorted(resolved.items())
            for f in fs
        )
    else:
        raise ValueError(
            f"data.streaming=true reads data.source.kind=hub or files, got {kind!r}; "
            "set data.streaming=false"
        )
    if train_split not in streams:
        raise ValueError(f"data.source.split={train_split!r} is not one of {list(streams)}")
    train = streams[train_split]
    val_split = source.get("val_split")
    validation_files = val_split
    if val_split and val_split in streams:
        validation = streams[val_split]
    else:
        validation, train = train.take(val_documents), train.skip(val_documents)
        validation_files = train_split
    max_docs = source.get("max_documents")
    if max_docs:
        train = train.take(int(max_docs))
    key += f"|val={val_split}:{val_documents}|docs={max_docs}"
    fingerprint = "stream-" + hashlib.sha256(key.encode()).hexdigest()
    file_checks = {"train": checks.get(train_split), "validation": checks.get(validation_files)}
    return train, validation, fingerprint, file_checks


def checked(rows: Iterator[dict], check_files: FileCheck | None) -> Iterator[dict]:
    """rows; an error reading them goes to check_files first, which names a bad local file
    where it finds one (datasets' own errors name no file)."""
    try:
        yield from rows
    except Exception as exc:
        if check_files is not None:
            check_files(exc)
        raise


def document_texts(documents, text_field: str) -> Iterator[str]:
    """The non-empty texts of a document stream; a non-string field is an error."""
    for document in documents:
        if text_field not in document:
            raise ValueError(
                f"documents have fields {sorted(document)}, not data.source.text_field="
                f"{text_field!r}"
            )
        text = require_text(document[text_field], text_field)
        if text:
            yield text


def stream_rows(documents) -> Iterator[dict]:
    """The rows of a ``datasets.IterableDataset``, one by one, also in a data-loader worker
    (plain iteration there would hand the worker only a share of the shards, and the slots
    are already split)."""
    for batch in documents.iter(batch_size=1):
        yield {key: values[0] for key, values in batch.items()}


def initial_state() -> dict:
    """Where a stream starts: epoch 0, block 0 of the source read from its beginning."""
    return {"epoch": 0, "block": 0, "source": None, "document": 0, "offset": 0}


class StreamingWindows(IterableDataset):
    """Batches of windows packed from a document stream tokenized on the fly.

    Args:
        documents: ``datasets.IterableDataset`` of the split.
        text_field: the column holding the text.
        tokenizer: a :class:`~training.data.tokenizer.TextTokenizer`.
        seq_len, batch_size: windows of seq_len + 1 tokens, batch_size per batch.
        rank, world_size: this process's share of the slots.
        streams: streams per rank (data-loader workers, or 1 in the main process).
        seed, shuffle_buffer: each block of shuffle_buffer documents is read in an order drawn
            from (seed, epoch, slot, block) (0: source order).
        repeat: start a new epoch when the documents run out (training) or stop (validation).
        document_mask: batches carry document_starts.
        check_files: of the documents' local files (see :func:`open_streams`), or None.
    Item: {"tokens": (B, T + 1) int64, "document_starts": (B, T + 1) bool (document_mask
    only), "stream": int, "stream_state": dict, where the stream continues after it}.
    Before iterating, ``states[j]`` (None: the beginning) says where stream j starts and
    ``rotation`` which stream worker 0 serves (so that the loader's round robin over workers
    continues with the stream that was next).
    """

    def __init__(
        self,
        documents,
        text_field: str,
        tokenizer: TextTokenizer,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        streams: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        repeat: bool = True,
        document_mask: bool = False,
        check_files: FileCheck | None = None,
    ):
        self.documents, self.text_field, self.tokenizer = documents, text_field, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat
        self.eos_for_mask = tokenizer.eos_id if document_mask else None
        self.check_files = check_files
        self.states: list[dict | None] = [None] * streams
        self.rotation = 0

    def __iter__(self):
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != self.streams:
            raise RuntimeError(f"{self.streams} streams per rank, but {workers} loader workers")
        stream = ((info.id if info is not None else 0) + self.rotation) % self.streams
        windows = []
        for window, state in self._windows(stream, self.states[stream] or initial_state()):
            windows.append(window)
            if len(windows) == self.batch_size:
                tokens = torch.from_numpy(np.stack(windows))  # (B, T + 1) int64
                batch = window_batch(tokens, self.eos_for_mask)
                if not isinstance(batch, dict):
                    batch = {"tokens": batch}
                yield {**batch, "stream": stream, "stream_state": state}
                windows = []

    def _slot_documents(self, stream: int):
        from datasets.distributed import split_dataset_by_node

        slots = self.world_size * self.streams
        return split_dataset_by_node(self.documents, self.rank * self.streams + stream, slots)

    def _windows(self, stream: int, state: dict) -> Iterator[tuple[np.ndarray, dict]]:
        """(window, where the stream continues after it) from state on, epoch after epoch."""
        packer = WindowPacker(self.seq_len)
        epoch, block, source, first_doc, offset = (
            state["epoch"],
            state["block"],
            state["source"],
            state["document"],
            state["offset"],
        )
        while True:
            documents = self._slot_documents(stream)
            if source is not None:
                documents.load_state_dict(source)
            rows = checked(stream_rows(documents), self.check_files)
            texts = document_texts(rows, self.text_field)
            seen_any = False
            while block_texts := list(islice(texts, self.shuffle_buffer or _READ_BLOCK)):
                seen_any = True
                after_block = copy.deepcopy(documents.state_dict())
                order = self._order(len(block_texts), epoch, stream, block)
                for start in range(first_doc, len(block_texts), _ENCODE_BATCH):
                    chunk = order[start : start + _ENCODE_BATCH]
                    encoded = self.tokenizer.encode_batch([block_texts[i] for i in chunk])
                    for index, ids in enumerate(encoded, start):
                        position = (epoch, block, source, index)
                        for window in packer.add(position, np.asarray(ids, np.int64), offset):
                            yield window, self._state(*packer.next_start)
                        offset = 0
                block, source, first_doc = block + 1, after_block, 0
            if not seen_any:
                if self.check_files is not None:
                    self.check_files(None)  # an empty file, rather than too few for the slots
                raise ValueError(
                    f"stream {stream} of rank {self.rank} has no documents (epoch {epoch}): "
                    "too few documents or files for data.num_workers x devices"
                )
            if not self.repeat:
                return
            epoch, block, source = epoch + 1, 0, None
            log.info(
                "data stream %d of rank %d ran out of documents: epoch %d, shuffle seed (%d, %d)",
                stream,
                self.rank,
                epoch,
                self.seed,
                epoch,
            )

    def _order(self, count: int, epoch: int, stream: int, block: int) -> np.ndarray:
        if not self.shuffle_buffer:
            return np.arange(count)
        slot = self.rank * self.streams + stream
        return np.random.default_rng([self.seed, epoch, slot, block]).permutation(count)

    @staticmethod
    def _state(position: tuple, offset: int) -> dict:
        epoch, block, source, document = position
        return {
            "epoch": epoch,
            "block": block,
            "source": source,
            "document": document,
            "offset": offset,
        }


class StreamPositions:
    """Where every stream of every rank continues, from the batches trained on.

    The state of a checkpoint holds each rank's streams (gathered from all ranks), so a run
    resumes with the same data layout: the same devices and data.num_workers.
    """

    def __init__(self, rank: int, world_size: int, streams: int):
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.states: list[dict | None] = [None] * streams
        self.batches = 0  # batches of this rank trained on

    def record(self, batch: dict) -> None:
        self.states[batch["stream"]] = batch["stream_state"]
        self.batches += 1

    def apply(self, dataset: StreamingWindows) -> None:
        """Start dataset's streams where the recorded ones continue."""
        dataset.states = list(self.states)
        dataset.rotation = self.batches % self.streams

    def state_dict(self) -> dict:
        local = {"states": self.states, "batches": self.batches}
        ranks = [local]
        if self.world_size > 1 and torch.distributed.is_initialized():
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, local)
        return {"world_size": self.world_size, "streams": self.streams, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        layout = (state["world_size"], state["streams"])
        if layout != (self.world_size, self.streams):
            raise ValueError(
                f"the checkpoint streamed data to {layout[0]} ranks x {layout[1]} streams, "
                f"this run has {self.world_size} x {self.streams}: resume a streaming run with "
                "the same devices and data.num_workers"
            )
        mine = state["ranks"][self.rank]
        self.states, self.batches = list(mine["states"]), mine["batches"]
