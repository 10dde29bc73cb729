"""Argument checks of the modules, the model config and generation: a TypeError (wrong kind)
or ValueError (wrong value) whose message names the argument and says what it must be."""

from __future__ import annotations

import math
import numbers
import operator

from flash_attn.ops.backend import BACKENDS


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value, minimum: int | None = None, optional: bool = False):
    """value as an int (any integer type, not a bool), >= minimum when given; None passes when
    optional."""
    if value is None and optional:
        return None
    bound = "" if minimum is None else f" >= {minimum}"
    kind = f"an integer{bound}" + (" or None" if optional else "")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be {kind}, got {number}")
    return number


def check_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
):
    """value as a finite float in the range [low, high] (an open end excludes the bound);
    None passes when optional."""
    if value is None and optional:
        return None
    left = "" if low is None else ("(" if low_open else "[") + f"{low}, "
    right = "" if high is None else f"{high}" + (")" if high_open else "]")
    where = (
        f" in {left or '(-inf, '}{right or 'inf)'}" if low is not None or high is not None else ""
    )
    kind = f"a finite number{where}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}")
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or too_low or too_high:
        raise ValueError(f"{name} must be {kind}, got {number}")
    return number


def check_bool(name: str, value) -> bool:
    """value when it is a bool (a string such as "no" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_choice(name: str, value, choices):
    """value when it is one of choices."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_backend(name: str, value):
    """value when it names a backend (None: the default, see ``ops/backend.py``)."""
    return check_choice(name, value, (None, *BACKENDS))
