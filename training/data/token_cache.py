"""One token array per split, stored as a raw memory-mapped file with a JSON sidecar.

The sidecar holds the dtype, the token count and a checksum. A file whose size or checksum
does not match its sidecar (an interrupted copy, a full disk, a crash during the build) is
rebuilt. Both files are written under a temporary name and renamed into place, and the
sidecar last: a present sidecar means a complete token file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from training.data.packing import require_text

_FULL_CHECKSUM_LIMIT = 512 << 20  # bytes; larger files are checked on 256 evenly spaced blocks
_BLOCK = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_checksum(path: str | os.PathLike) -> str:
    """blake2b of the whole file up to 512 MiB, else of 256 evenly spaced 1 MiB blocks + size."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_CHECKSUM_LIMIT:
            while chunk := f.read(16 * _BLOCK):
                digest.update(chunk)
        else:
            for offset in np.linspace(0, size - _BLOCK, 256).astype(np.int64):
                f.seek(int(offset))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_tokens(path: str | os.PathLike, verify: bool = True) -> np.memmap | None:
    """The memory-mapped tokens at path, or None when missing, truncated or corrupt."""
    path = Path(path)
    meta_path = _sidecar(path)
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        if os.path.getsize(path) != meta["num_tokens"] * dtype.itemsize:
            return None
        if verify and file_checksum(path) != meta["checksum"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta["num_tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))


def write_tokens(path: str | os.PathLike, chunks, num_tokens: int, dtype, extra: dict) -> None:
    """Write num_tokens tokens, given as an iterable of 1-D integer arrays, to path.

    Args:
        chunks: arrays whose lengths sum to num_tokens, written in order.
        dtype: np.uint16 or np.uint32.
        extra: more sidecar fields (what was tokenised, with what).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    dtype = np.dtype(dtype)
    written = 0
    with open(tmp, "wb") as f:
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.size and (chunk.min() < 0 or chunk.max() > np.iinfo(dtype).max):
                raise ValueError(f"token id out of range for {dtype}")
            f.write(chunk.astype(dtype, copy=False).tobytes())
            written += chunk.size
        f.flush()
        os.fsync(f.fileno())
    if written != num_tokens:
        tmp.unlink()
        raise RuntimeError(f"token cache {path}: wrote {written} tokens, expected {num_tokens}")
    meta = {"dtype": dtype.name, "num_tokens": num_tokens, "checksum": file_checksum(tmp), **extra}
    meta_path = _sidecar(path)
    meta_path.unlink(missing_ok=True)  # the old sidecar must not vouch for the new file
    os.replace(tmp, path)
    meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, meta_path)


def tokenize_to_cache(dataset, tokenizer, text_field: str, path, num_proc: int, extra: dict):
    """Tokenise a ``datasets.Dataset`` in parallel (``map(num_proc=...)``), end-of-text after
    each document (empty documents are skipped), and write the concatenation to path.
    Returns the memmap."""
    num_proc = max(1, min(int(num_proc or 1), len(dataset)))

    def encode(batch):
        texts = [require_text(text, text_field) for text in batch[text_field]]
        ids = [ids if text else [] for text, ids in zip(texts, tokenizer.encode_batch(texts))]
        return {"ids": ids, "len": [len(x) for x in ids]}

    tokenized = dataset.map(
        encode,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        desc=f"tokenizing {Path(path).name}",
    )
    num_tokens = int(np.sum(tokenized["len"], dtype=np.int64)) if len(tokenized) else 0
    dtype = token_dtype(tokenizer.vocab_size)

    def chunks():
        step = 1024
        for start in range(0, len(tokenized), step):
            rows = tokenized[start : start + step]["ids"]
            if rows:
                yield np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])

    write_tokens(path, chunks(), num_tokens, dtype, extra)
    tokens = load_tokens(path, verify=False)
    if tokens is None:
        raise RuntimeError(f"token cache {path} unreadable right after writing it")
    return tokens
