"""Tokenizers behind one small interface.

Three kinds:
- ``bytes``: UTF-8 bytes are the tokens (ids 0..255) plus an end-of-text id 256. Nothing to
  train or download.
- ``bpe``: a byte-level BPE trained here with the ``tokenizers`` library on the training text
  (a few MB are enough for a small vocabulary), cached as JSON in the cache folder.
- ``pretrained``: a Hugging Face tokenizer (a checkpoint folder, a hub id such as ``gpt2`` or
  ``EleutherAI/gpt-neox-20b``) or a bare ``tokenizer.json``.

:meth:`TextTokenizer.to_transformers` gives each of them as a transformers tokenizer, which is
what a run writes into its Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flash_attn.models.hf_checkpoint import looks_like_path

EOS_TOKEN = "<|endoftext|>"


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable-character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def byte_level_backend():
    """A ``tokenizers.Tokenizer`` with the ids of the "bytes" kind: byte b is id b, and
    ``<|endoftext|>`` is 256 (byte-level BPE with no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE(vocab=_byte_decoder(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return backend


class TextTokenizer:
    """Text <-> token ids, with an end-of-text id appended to every document.

    Args:
        kind: "bytes", "bpe" or "pretrained".
        backend: a ``tokenizers.Tokenizer`` (None for "bytes").
        name: human-readable identity (used in cache folder names).
        hf_tokenizer: the transformers tokenizer backend came from (pretrained folders and hub
            ids); its eos token ends documents, and :meth:`to_transformers` returns it.
    """

    def __init__(self, kind: str, backend=None, name: str = "bytes", hf_tokenizer=None):
        self.kind = kind
        self.backend = backend
        self.name = name
        self.hf_tokenizer = hf_tokenizer
        if backend is None:
            self.vocab_size = 257
            self.eos_id = 256
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            eos_token = getattr(hf_tokenizer, "eos_token", None) or EOS_TOKEN
            eos = backend.token_to_id(eos_token)
            if eos is None:
                raise ValueError(
                    f"tokenizer {name!r} has no {eos_token!r} token; documents need an "
                    "end-of-text separator"
                )
            self.eos_id = eos

    def to_transformers(self):
        """The tokenizer as a transformers tokenizer (``AutoTokenizer`` reopens what its
        ``save_pretrained`` writes), with the same ids. A pretrained one is returned as
        loaded; "bytes" and "bpe" become a ``PreTrainedTokenizerFast`` whose bos, eos and pad
        token is ``<|endoftext|>``."""
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer
        from transformers import PreTrainedTokenizerFast

        backend = self.backend or byte_level_backend()
        eos = backend.id_to_token(self.eos_id)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token=eos, eos_token=eos, pad_token=eos
        )

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the ids (vocabulary, merges, normalisation)."""
        text = "bytes-v1" if self.backend is None else self.backend.to_str()
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, each followed by ``eos_id``."""
        if self.backend is None:
            return [list(t.encode("utf-8")) + [self.eos_id] for t in texts]
        return [e.ids + [self.eos_id] for e in self.backend.encode_batch(list(texts))]

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without the end-of-text id."""
        if self.backend is None:
            return list(text.encode("utf-8"))
        return self.backend.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids (end-of-text shown as ``<|endoftext|>``)."""
        ids = [int(i) for i in ids]
        if self.backend is None:
            out, run = [], bytearray()
            for i in ids:
                if i == self.eos_id:
                    out.append(run.decode("utf-8", errors="replace") + EOS_TOKEN)
                    run = bytearray()
                elif 0 <= i < 256:
                    run.append(i)
            out.append(run.decode("utf-8", errors="replace"))
            return "".join(out)
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each token stands for (0 for special tokens).

        Exact for byte-level tokenizers; otherwise the length of the token decoded alone.
        Used for bits per byte: total nats / (ln 2 * total bytes).
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        if self.backend is None:
            lengths[:256] = 1
            return lengths
        spec = json.loads(self.backend.to_str())
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        decoder = _byte_decoder()
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if byte_level and all(c in decoder for c in token):
                lengths[i] = len(token)
            else:
                lengths[i] = len(self.backend.decode([i]).encode("utf-8"))
        return lengths


def _train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    return bpe._tokenizer


def _load_transformers_tokenizer(name: str):
    """AutoTokenizer's fast tokenizer of a folder with tokenizer_config.json or of a hub id
    (None when it has none, or when the hub cannot be reached)."""
    path = Path(name).expanduser()
    if path.is_file() or (path.is_dir() and not (path / "tokenizer_config.json").is_file()):
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except Exception:  # offline, or not a transformers tokenizer: the tokenizer.json path
        return None
    return tokenizer if getattr(tokenizer, "is_fast", False) else None


def _load_pretrained(name: str):
    """(tokenizers.Tokenizer, transformers tokenizer or None) of a folder, hub id or file."""
    from tokenizers import Tokenizer

    path = Path(name).expanduser()
    if not path.exists() and looks_like_path(name):
        raise FileNotFoundError(
            f"data.tokenizer.name={name}: no tokenizer folder or tokenizer.json at "
            f"{path.absolute()}"
        )
    hf_tokenizer = _load_transformers_tokenizer(name)
    if hf_tokenizer is not None:
        return hf_tokenizer.backend_tokenizer, hf_tokenizer
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        return Tokenizer.from_file(str(file)), None
    try:
        return Tokenizer.from_pretrained(name), None
    except Exception as exc:
        raise RuntimeError(
            f"Could not load the tokenizer {name!r}: {exc}\n"
            f"It is neither a local tokenizer.json / folder (nothing at {path.absolute()}) nor "
            "reachable on the Hugging Face hub (this machine may be offline, or the name is "
            "wrong). Provide it locally: copy tokenizer.json from a machine "
            f'with network (e.g. python -c "from tokenizers import Tokenizer; '
            f"Tokenizer.from_pretrained('{name}').save('tokenizer.json')\") and pass "
            "data.tokenizer.name=/path/to/tokenizer.json, or fill the Hugging Face hub cache "
            f"(HF_HOME, currently {os.environ.get('HF_HOME', '~/.cache/huggingface')})."
        ) from exc


def build_tokenizer(
    kind: str,
    name: str | None = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike | None = None,
    corpus_fingerprint: str = "",
    training_texts=None,
) -> TextTokenizer:
    """Make (or load from the cache) the tokenizer a data config asks for.

    Args:
        kind: "bytes", "bpe" (trained here) or "pretrained" (``name``: hub id or local path).
        vocab_size: target vocabulary of a trained BPE (including the end-of-text token).
        cache_dir: folder for trained tokenizers (``<cache_dir>/tokenizers``).
        corpus_fingerprint: identity of the training text; part of the cache key.
        training_texts: zero-argument callable returning an iterable of strings, called only
            when a BPE must be trained.
    """
    if kind == "bytes":
        return TextTokenizer("bytes")
    if kind == "pretrained":
        if not name:
            raise ValueError("data.tokenizer.name is required for kind='pretrained'")
        backend, hf_tokenizer = _load_pretrained(name)
        label = Path(name).name or name
        return TextTokenizer("pretrained", backend, name=label, hf_tokenizer=hf_tokenizer)
    if kind != "bpe":
        raise ValueError(f"tokenizer kind must be 'bytes', 'bpe' or 'pretrained', got {kind!r}")
    if vocab_size < 258:
        raise ValueError(f"data.tokenizer.vocab_size must be >= 258 for a BPE, got {vocab_size}")
    from tokenizers import Tokenizer

    key = hashlib.sha256(f"bpe-v1|{vocab_size}|{corpus_fingerprint}".encode()).hexdigest()[:16]
    label = f"bpe{vocab_size}-{key}"
    path = Path(cache_dir or ".") / "tokenizers" / f"{label}.json"
    if path.is_file():
        try:
            return TextTokenizer("bpe", Tokenizer.from_file(str(path)), name=label)
        except Exception:
            path.unlink()  # unreadable (interrupted write on an old version): train again
    if training_texts is None:
        raise ValueError("a BPE tokenizer must be trained but no training text was given")
    backend = _train_bpe(training_texts(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    backend.save(str(tmp))
    os.replace(tmp, path)
    return TextTokenizer("bpe", backend, name=label)
