"""Documents packed into training windows, and the document boundaries inside a window.

Both data paths cut the same windows: the token stream is every document's tokens followed
by the end-of-text id, and window k holds tokens [k * seq_len, (k + 1) * seq_len + 1) (the
last token of a window is the first of the next, so every token is a target once).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def require_text(value, text_field: str) -> str:
    """value when it is a string, else an error naming data.source.text_field."""
    if not isinstance(value, str):
        raise TypeError(
            f"data.source.text_field={text_field!r} holds {type(value).__name__} values, not "
            "text; point it at the column with the documents' text"
        )
    return value


def document_starts(windows: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T + 1) bool: true at each window's first token and after every end-of-text id.

    Args:
        windows: (B, T + 1) integer token windows.
    """
    starts = torch.zeros_like(windows, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = windows[:, :-1] == eos_id
    return starts


def batch_tokens(batch) -> torch.Tensor:
    """The (B, T + 1) windows of a batch: the batch itself, or its "tokens" entry."""
    return batch["tokens"] if isinstance(batch, dict) else batch


def window_batch(windows: torch.Tensor, eos_id: int | None) -> torch.Tensor | dict:
    """The batch the model trains on: the (B, T + 1) int64 windows as they are, or with
    document masking (eos_id given) {"tokens": windows, "document_starts": (B, T + 1) bool}."""
    if eos_id is None:
        return windows
    return {"tokens": windows, "document_starts": document_starts(windows, eos_id)}


class WindowPacker:
    """Cuts windows of seq_len + 1 tokens from documents fed in order, and says where the
    next window starts so that a resumed stream cuts the same windows.

    Each document is fed with a position (any value describing where it came from, e.g. its
    place in the stream); :attr:`next_start` is (position of the document the next window
    starts in, token offset in that document's tokens).
    """

    def __init__(self, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self._pending: deque[tuple[Any, np.ndarray]] = deque()  # (position, tokens)
        self._offset = 0  # tokens of the first pending document already behind us
        self._available = 0  # pending tokens from the offset on

    @property
    def next_start(self) -> tuple[Any, int] | None:
        """(position, offset) of the next window's first token; None when nothing is pending."""
        if not self._pending:
            return None
        return self._pending[0][0], self._offset

    def add(self, position: Any, tokens: np.ndarray, offset: int = 0) -> Iterator[np.ndarray]:
        """Feed one document's tokens (from offset on) and yield every window it completes,
        each (seq_len + 1,) int64."""
        if not self._pending:
            self._offset = offset
        elif offset:
            raise ValueError("an offset is only allowed for the first document fed")
        self._pending.append((position, tokens))
        self._available += len(tokens) - (offset if len(self._pending) == 1 else 0)
        while self._available >= self.seq_len + 1:
            yield self._cut()

    def _cut(self) -> np.ndarray:
        window = np.empty(self.seq_len + 1, dtype=np.int64)
        filled, offset = 0, self._offset
        for _, tokens in self._pending:
            take = min(len(tokens) - offset, self.seq_len + 1 - filled)
            window[filled : filled + take] = tokens[offset : offset + take]
            filled, offset = filled + take, 0
            if filled == self.seq_len + 1:
                break
        self._advance(self.seq_len)
        return window

    def _advance(self, count: int) -> None:
        self._available -= count
        count += self._offset
        while self._pending and count >= len(self._pending[0][1]):
            count -= len(self._pending.popleft()[1])
        self._offset = count
