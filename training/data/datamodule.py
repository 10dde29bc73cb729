"""Windows of a cached token array (with a sampler that resumes at the exact batch), or of a
document stream (training/data/streaming.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Sampler

from training.data.packing import window_batch
from training.data.sources import HubUnreachable, load_text_dataset
from training.data.streaming import (
    StreamingWindows,
    StreamPositions,
    checked,
    document_texts,
    open_streams,
)
from training.data.token_cache import load_tokens, tokenize_to_cache
from training.data.tokenizer import TextTokenizer, build_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = "tokens-v2"  # v2: empty documents are skipped
STREAMING_ENTROPY_TOKENS = 1_000_000  # tokenized at start-up for the unigram entropy


def collate_windows(windows: list[torch.Tensor], eos_id: int | None):
    """Stacked (B, T + 1) windows, with their document starts when eos_id is given."""
    return window_batch(torch.stack(windows), eos_id)


class WindowDataset(Dataset):
    """Windows of seq_len + 1 tokens of one cached token file, indexed by start offset.

    The memmap is opened lazily in each process (a pickled memmap would be copied whole
    into every data-loader worker). Item: (seq_len + 1,) int64; inputs are ``[:-1]``,
    targets ``[1:]``.
    """

    def __init__(self, path: str | os.PathLike, dtype, num_tokens: int, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_tokens < seq_len + 1:
            raise ValueError(
                f"{path}: {num_tokens} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}; use more data or a shorter data.seq_len"
            )
        self.path, self.dtype, self.num_tokens, self.seq_len = str(path), dtype, num_tokens, seq_len
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(
                self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,)
            )
        return self._tokens

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, start: int) -> torch.Tensor:
        window = self.tokens[start : start + self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))


class ResumableWindowSampler(Sampler[int]):
    """Start offsets of non-overlapping windows in a seeded random order, one shard per rank.

    Each epoch draws a fresh order and a random offset (so window boundaries move between
    epochs) from (seed, epoch) alone, so every rank draws the same order and takes every
    world_size-th window, batch_size-aligned (the incomplete last batch is dropped).
    ``consumed`` counts windows trained on by all ranks in the current epoch; it is advanced
    as batches are trained on and saved in checkpoints, so a resumed run continues with the
    exact next batch. The sampler keeps its own epoch (it starts the next one when an
    iteration begins with the current one used up) instead of following the trainer's epoch
    counter, which a run resumed from its final checkpoint advances early.
    """

    def __init__(
        self,
        num_tokens: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        batch_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_windows = (num_tokens - 1) // seq_len
        if self.num_windows < world_size * batch_size:
            raise ValueError(
                f"{self.num_windows} windows of {seq_len + 1} tokens cannot fill one batch of "
                f"{batch_size} on each of {world_size} ranks"
            )
        self.num_tokens, self.seq_len, self.seed = num_tokens, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0

    def starts(self, epoch: int) -> np.ndarray:
        """(num_windows,) int64 global start offsets of an epoch, in visiting order."""
        index = np.arange(self.num_windows, dtype=np.int64)
        if not self.shuffle:
            return index * self.seq_len
        rng = np.random.default_rng([self.seed, epoch])
        slack = self.num_tokens - 1 - self.num_windows * self.seq_len
        offset = int(rng.integers(0, slack + 1))
        return offset + rng.permutation(index) * self.seq_len

    def __len__(self) -> int:
        per_rank = self.num_windows // self.world_size
        return per_rank - per_rank % self.batch_size

    def __iter__(self):
        if self.consumed // self.world_size >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
        local = self.starts(self.epoch)[self.rank : len(self) * self.world_size : self.world_size]
        return iter(local[self.consumed // self.world_size :].tolist())

    def advance(self, local_samples: int) -> None:
        """Record that each rank has trained on local_samples more windows."""
        self.consumed += local_samples * self.world_size

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows:
            raise ValueError(
                f"checkpoint sampler covers {state['num_windows']} windows, this data has "
                f"{self.num_windows}: a different dataset, tokenizer or seq_len"
            )
        self.epoch, self.seed = state["epoch"], state["seed"]
        # consumed counts all ranks' windows: still right under another world size
        self.consumed = state["consumed"] - state["consumed"] % self.world_size


class GPTDataModule(L.LightningDataModule):
    """Text -> tokenizer -> cached token arrays -> random windows.

    Args:
        source: where the text comes from (see ``training.data.sources.load_text_dataset``).
        tokenizer: {kind: bytes | bpe | pretrained, name, vocab_size, train_bytes}.
        seq_len: tokens per training sequence (windows hold seq_len + 1).
        batch_size: sequences per device per micro-batch.
        num_workers: data-loader worker processes.
        num_proc: processes tokenising the text (``datasets.map(num_proc=...)``).
        cache_dir: shared cache folder; token files go to ``<cache_dir>/tokens/<key>/``.
        seed: window order seed.
        streaming: tokenize documents on the fly in the loader workers instead of caching the
            corpus (hub and files sources).
        shuffle: train on windows in a seeded random order (false: in corpus order, the same
            windows on both paths).
        shuffle_buffer: streaming: documents read in a shuffled order together.
        val_documents: streaming: documents held out for validation when the source has no
            validation split.
        document_mask: batches carry document starts (attention and positions per document).
    Batches: (B, T + 1) int64 windows, or a dict with "tokens" (those windows) and, with
    document_mask, "document_starts" (B, T + 1) bool (streaming: also the stream position).
    The LightningModule is given it as its :class:`~training.lightning_module.TrainingData`
    (``token_bytes``, ``on_train_batch_consumed``).
    """

    def __init__(
        self,
        source: dict,
        tokenizer: dict,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: int = 1,
        cache_dir: str = ".cache",
        seed: int = 0,
        pin_memory: bool = True,
        streaming: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 10000,
        val_documents: int = 1000,
        document_mask: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.source = dict(source)
        self.tokenizer_cfg = dict(tokenizer)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_workers, self.num_proc = num_workers, num_proc
        self.cache_dir, self.seed = os.path.expanduser(str(cache_dir)), seed
        self.pin_memory = pin_memory
        self.streaming, self.shuffle, self.shuffle_buffer = streaming, shuffle, shuffle_buffer
        self.val_documents, self.document_mask = val_documents, document_mask
        self.streams: dict | None = None  # streaming: {"train", "validation", "text_field"}
        self.stream_positions: StreamPositions | None = None
        self.tokenizer: TextTokenizer | None = None
        self.files: dict[str, Path] = {}
        self.train_sampler: ResumableWindowSampler | None = None
        self._pending_state: dict | None = None

    # -- building the cache ------------------------------------------------------------------
    def build(self) -> dict[str, Path]:
        """Tokenizer and token files, built once and then read from the cache (streaming: the
        tokenizer and the document streams; no token files)."""
        if self.files or self.streams:
            return self.files
        Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        # Processes of one node (DDP ranks, concurrent runs) build a cache entry once.
        with FileLock(Path(self.cache_dir) / ".build.lock"):
            try:
                return self._build_locked()
            except HubUnreachable as exc:
                raise HubUnreachable(f"{exc}{self._hub_tokenizer_note()}") from exc

    def _hub_tokenizer_note(self) -> str:
        """What to do about the tokenizer too when it also comes from the hub ("" if not)."""
        name = self.tokenizer_cfg.get("name")
        if self.tokenizer_cfg.get("kind") != "pretrained" or not name:
            return ""
        if Path(name).expanduser().exists():
            return ""
        return (
            f"\nThe tokenizer comes from the hub too (data.tokenizer.name={name}): save it on a "
            f'machine with network (python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{name}').save_pretrained('tokenizer')\"), copy the "
            "folder to this machine and add data.tokenizer.name=/path/to/tokenizer."
        )

    def _build_tokenizer(self, fingerprint: str, texts) -> TextTokenizer:
        """The configured tokenizer; a BPE is trained on the first train_bytes of texts."""
        tok_cfg = self.tokenizer_cfg

        def training_texts():
            budget = int(tok_cfg.get("train_bytes") or 20_000_000)
            for text in texts() if budget else []:
                yield text
                budget -= len(text)
                if budget <= 0:
                    return

        return build_tokenizer(
            tok_cfg.get("kind", "bytes"),
            tok_cfg.get("name"),
            int(tok_cfg.get("vocab_size") or 0),
            self.cache_dir,
            fingerprint,
            training_texts,
        )

    def _build_locked(self) -> dict[str, Path]:
        if self.streaming:
            return self._open_streams()
        dataset, text_field, fingerprint = load_text_dataset(
            self.source, self.cache_dir, seed=self.seed
        )
        self.tokenizer = self._build_tokenizer(fingerprint, lambda: dataset["train"][text_field])
        key_text = json.dumps([CACHE_FORMAT, fingerprint, self.tokenizer.fingerprint])
        key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
        kind = self.source.get("kind")
        label = str(self.source.get("name") if kind == "hub" else kind).replace("/", "_")
        folder = Path(self.cache_dir) / "tokens" / f"{label}-{self.tokenizer.name}-{key}"
        for split in ("train", "validation"):
            path = folder / f"{split}.bin"
            if load_tokens(path) is None:
                if path.exists():
                    log.warning("token cache %s is truncated or corrupt: rebuilding it", path)
                tokenize_to_cache(
                    dataset[split],
                    self.tokenizer,
                    text_field,
                    path,
                    self.num_proc,
                    {"source": fingerprint, "tokenizer": self.tokenizer.name, "split": split},
                )
            self.files[split] = path
        return self.files

    def _open_streams(self) -> dict[str, Path]:
        train, validation, fingerprint, file_checks = open_streams(
            self.source, self.cache_dir, self.val_documents
        )
        text_field = self.source.get("text_field") or "text"
        self.tokenizer = self._build_tokenizer(
            fingerprint, lambda: document_texts(checked(train, file_checks["train"]), text_field)
        )
        self.streams = {
            "train": train,
            "validation": validation,
            "text_field": text_field,
            "file_checks": file_checks,
        }
        return self.files

    def prepare_data(self) -> None:
        self.build()

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        files = self.build()
        if self.streaming:
            self._setup_streams()
            return
        rank, world = self._rank_and_world()
        self.datasets = {}
        for split, path in files.items():
            tokens = load_tokens(path, verify=False)
            self.datasets[split] = WindowDataset(path, tokens.dtype, len(tokens), self.seq_len)
        train = self.datasets["train"]
        self.train_sampler = ResumableWindowSampler(
            train.num_tokens, self.seq_len, self.seed, rank, world, self.shuffle, self.batch_size
        )
        if self._pending_state is not None:
            self.train_sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        val = self.datasets["validation"]
        try:
            self.val_sampler = ResumableWindowSampler(
                val.num_tokens, self.seq_len, 0, rank, world, False, self.batch_size
            )
        except ValueError as exc:
            raise ValueError(
                f"validation split too small: {exc}; hold out more text "
                "(data.source.val_fraction) or lower data.batch_size / data.seq_len"
            ) from exc

    def _setup_streams(self) -> None:
        rank, world = self._rank_and_world()
        streams = max(1, self.num_workers)
        common = dict(
            text_field=self.streams["text_field"],
            tokenizer=self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            streams=streams,
            document_mask=self.document_mask,
        )
        self.datasets = {
            "train": StreamingWindows(
                self.streams["train"],
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer if self.shuffle else 0,
                check_files=self.streams["file_checks"]["train"],
                **common,
            ),
            "validation": StreamingWindows(
                self.streams["validation"],
                repeat=False,
                check_files=self.streams["file_checks"]["validation"],
                **common,
            ),
        }
        pending = self._pending_state
        self.stream_positions = StreamPositions(rank, world, streams)
        if pending is not None:
            self.stream_positions.load_state_dict(pending)
            self._pending_state = None

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, split: str, sampler: Sampler | None) -> DataLoader:
        pin = self.pin_memory and torch.cuda.is_available()
        if self.streaming:  # the dataset yields whole batches
            return DataLoader(
                self.datasets[split], batch_size=None, num_workers=self.num_workers, pin_memory=pin
            )
        eos = self.tokenizer.eos_id if self.document_mask else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=False,
            collate_fn=partial(collate_windows, eos_id=eos),
        )

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            self.stream_positions.apply(self.datasets["train"])
        return self._loader("train", self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", getattr(self, "val_sampler", None))

    # -- facts the model and the logs need ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        self.build()
        return self.tokenizer.vocab_size

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int64 bytes of text per token, for bits per byte."""
        self.build()
        return torch.from_numpy(self.tokenizer.token_byte_lengths())

    def _sample_tokens(self, max_tokens: int) -> np.ndarray:
        """The first max_tokens training tokens (streaming: of the stream's first documents)."""
        if not self.streaming:
            return load_tokens(self.build()["train"], verify=False)[:max_tokens]
        self.build()
        chunks, count = [], 0
        train = checked(self.streams["train"], self.streams["file_checks"]["train"])
        for text in document_texts(train, self.streams["text_field"]):
            chunks.append(np.asarray(self.tokenizer.encode_batch([text])[0], dtype=np.int64))
            count += len(chunks[-1])
            if count >= max_tokens:
                break
        return np.concatenate(chunks)[:max_tokens]

    def unigram_entropy(self, max_tokens: int = 50_000_000) -> dict:
        """Entropy of the training tokens' unigram distribution (the loss of a model that
        ignores context), in nats per token and bits per byte (streaming: of the first
        STREAMING_ENTROPY_TOKENS tokens)."""
        if self.streaming:
            max_tokens = min(max_tokens, STREAMING_ENTROPY_TOKENS)
        tokens = self._sample_tokens(max_tokens)
        counts = np.bincount(tokens, minlength=self.tokenizer.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        nats = float(-(p * np.log(p)).sum())
        total_bytes = float((counts * self.tokenizer.token_byte_lengths()).sum())
        bpb = nats * counts.sum() / (math.log(2) * total_bytes) if total_bytes else float("nan")
        return {"nats_per_token": nats, "bits_per_byte": bpb, "num_tokens": int(counts.sum())}

    # -- resumption ----------------------------------------------------------------------------
    def on_train_batch_consumed(self, local_samples: int, batch=None) -> None:
        """Record that this rank trained on a batch of local_samples windows (the batch
        itself tells a stream's position)."""
        if self.train_sampler is not None:
            self.train_sampler.advance(local_samples)
        if self.stream_positions is not None:
            self.stream_positions.record(batch)

    def state_dict(self) -> dict:
        if self.stream_positions is not None:
            return {"train_streams": self.stream_positions.state_dict()}
        if self.train_sampler is None:
            return {}
        return {"train_sampler": self.train_sampler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.streaming:
            state = state_dict.get("train_streams")
            if state is None:
                raise ValueError(
                    "the checkpoint holds no stream positions: it comes from a run with "
                    "data.streaming=false; resume it with the same setting"
                )
            if self.stream_positions is None:
                self._pending_state = state
            else:
                self.stream_positions.load_state_dict(state)
            return
        state = state_dict.get("train_sampler")
        if state is None:
            return
        if self.train_sampler is None:
            self._pending_state = state
        else:
            self.train_sampler.load_state_dict(state)
