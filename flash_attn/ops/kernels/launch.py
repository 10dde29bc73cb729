"""What every launcher needs around a kernel launch."""

from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one for the launch (no-op on CPU, e.g. under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
