"""Helper of the bad-input tests: each case is (call, expected exception type, the name its
message must contain)."""

from __future__ import annotations

import pytest


def assert_rejected(call, error: type[Exception], name: str) -> None:
    """call() raises exactly error (not a subclass such as an IndexError from deep inside),
    with a message that names the argument or file."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert name in str(info.value), str(info.value)
