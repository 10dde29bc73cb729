"""What a call resolved to, kept per call signature so that later calls of the signature skip
the work: the key (:func:`launch_key`, :func:`call_signature`), the cache (:class:`PlanCache`),
and :func:`contiguous_aligned` for the tensors a key does not describe.

The functional APIs keep their checks and launches here; the kernels' launchers (``triton/``
folders) keep their launch objects. It imports torch only, so ``import flash_attn`` works
without Triton.
"""

from __future__ import annotations

import os

import torch


def contiguous_aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and at a 16-byte aligned address (a copy only where t is not both): what a
    launch plan needs of a tensor whose layout its key did not record, such as a gradient
    handed to a backward (Triton specialises pointers on their alignment)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def launch_key(t) -> tuple | None:
    """What a check or a launch reads of an argument that may be a tensor: its shape, strides,
    dtype, device and 16-byte alignment (Triton specialises pointers on it); None stays None,
    and anything else counts by its identity (the checks then name it)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)
    return (type(t), id(t))


def call_signature(tensors: tuple, options: tuple) -> tuple | None:
    """The key of a call's plan: the :func:`launch_key` of each of ``tensors``, the values of
    ``options`` (plain scalars, dtypes, strings) and ``FLASH_ATTN_BACKEND``; None while
    ``torch.compile`` traces (it traces the checks and the op instead)."""
    if torch.compiler.is_compiling():
        return None
    return (*map(launch_key, tensors), *options, os.environ.get("FLASH_ATTN_BACKEND"))


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


class PlanCache:
    """What the first call of each call signature checked and derived (its plan), so that later
    calls of the signature skip the checks. ``get`` of an unknown key (or of None, or of an
    unhashable one) is None; ``keep`` stores a plan under a key (one that ``get`` can find) and
    returns it, dropping the oldest plan past ``max_plans``."""

    def __init__(self, max_plans: int = 1024):
        self.max_plans = max_plans
        self.plans: dict = {}

    def get(self, key):
        if key is None:
            return None
        try:
            return self.plans.get(key)
        except TypeError:  # an option that is not hashable: no plan, the checks name it
            return None

    def keep(self, key, plan):
        if key is not None and _hashable(key):
            if len(self.plans) >= self.max_plans:
                del self.plans[next(iter(self.plans))]
            self.plans[key] = plan
        return plan
