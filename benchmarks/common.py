"""Benchmarking helpers: wall time, peak memory, attention FLOPs.

Four functions, usable for any op:

- :func:`benchmark_time` runs ``fn()`` ``warmup`` times, then ``repeats`` timed times, and
  returns the median (CUDA events around each call on a GPU, ``time.perf_counter`` on CPU).
- :func:`peak_memory` runs ``fn()`` once and returns the most bytes that were live at any
  moment during the call beyond those live when it started (inputs and anything allocated
  before do not count; what ``fn`` allocates and still holds at the end does).
  On CUDA this is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus ``memory_allocated()`` before the call. On CPU, torch keeps no such counter, so the
  call runs under ``torch.profiler.profile(profile_memory=True)``, which records every
  allocation and free of the CPU allocator with its size and time; replaying them in time
  order gives the live bytes after each event, and the peak is the largest of those (frees of
  tensors that existed before the call make the running total go below zero, so such memory
  is never counted twice; the result is clamped at 0).
- :func:`attention_flops` counts the matmul FLOPs of attention exactly over the pairs a query
  may attend (causal and masked pairs are not counted); the backward counts 2.5x the forward,
  as the official FlashAttention benchmark does.
- :func:`available_memory` says how many bytes a device can still allocate, so a benchmark can
  refuse a size that will not fit before allocating anything.

Example::

    t = benchmark_time(lambda: f(x), repeats=10)
    print(t.median_s, tflops(attention_flops(...), t.median_s), peak_memory(lambda: f(x)))
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "Timing",
    "attention_flops",
    "available_memory",
    "benchmark_time",
    "machine_name",
    "peak_memory",
    "tflops",
]


@dataclass
class Timing:
    """Seconds per call: the median and min over the timed repeats, and every repeat."""

    median_s: float
    min_s: float
    times_s: list[float] = field(default_factory=list)


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def benchmark_time(
    fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device=None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed calls.

    Args:
        fn: callable without arguments; its result is discarded.
        warmup: untimed calls first (autotuning, caches, lazy initialisation).
        repeats: timed calls, >= 1.
        device: where fn runs (``"cuda"`` uses CUDA events, anything else ``perf_counter``);
            default: cuda when available.
    Returns:
        :class:`Timing` in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = _as_device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), times)


def _cpu_allocation_events(prof) -> list[tuple[int, int]]:
    """(time_ns, +bytes for an allocation / -bytes for a free) of the CPU allocator."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                events.append((event.start_time_ns, fields.alloc_size))
    return sorted(events)


def peak_memory(fn: Callable[[], object], device=None) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was live when it started (see module doc).

    Args:
        fn: callable without arguments, run once; its result is dropped before returning.
        device: ``"cuda"`` (``torch.cuda.max_memory_allocated``) or ``"cpu"`` (allocation
            events replayed from ``torch.profiler``); default: cuda when available.
    Returns:
        int, bytes (>= 0).
    """
    device = _as_device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in _cpu_allocation_events(prof):
        live += nbytes
        peak = max(peak, live)
    return peak


def _visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Number of (query, key) pairs one head computes, bottom-right aligned causal mask."""
    if not causal:
        return seqlen_q * seqlen_k
    # query i sees keys j <= i + seqlen_k - seqlen_q: min(seqlen_k, max(0, i + 1 + sk - sq))
    shift = seqlen_k - seqlen_q
    return sum(min(seqlen_k, max(0, i + 1 + shift)) for i in range(seqlen_q))


_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    headdim: int,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    mode: str = "fwd",
) -> float:
    """Matmul FLOPs of attention: 4 * headdim per visible (query, key) pair and head.

    Forward: 2 * headdim for a score (Q K^T) plus 2 * headdim for its share of P V. The
    backward counts 2.5x the forward (five matmuls instead of two), ``fwd_bwd`` 3.5x, as the
    official benchmark does; only pairs that may attend are counted (exactly, not /2 for causal).

    Args:
        batch, nheads, seqlen_q, seqlen_k, headdim: sizes (nheads = query heads).
        causal: bottom-right aligned causal mask.
        mask: optional bool, broadcastable to (batch, nheads, seqlen_q, seqlen_k), True = may
            attend; combined with ``causal``.
        mode: ``"fwd"``, ``"bwd"`` or ``"fwd_bwd"``.
    Returns:
        float, FLOPs.
    """
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_MODE_FACTOR)}, got {mode!r}")
    if mask is not None:
        allowed = mask.expand(batch, nheads, seqlen_q, seqlen_k)
        if causal:
            i = torch.arange(seqlen_q, device=mask.device).unsqueeze(1)
            j = torch.arange(seqlen_k, device=mask.device).unsqueeze(0)
            allowed = allowed & (j <= i + (seqlen_k - seqlen_q))
        pairs = int(allowed.sum().item())
    else:
        pairs = batch * nheads * _visible_pairs(seqlen_q, seqlen_k, causal)
    return 4.0 * headdim * pairs * _MODE_FACTOR[mode]


def tflops(flops: float, seconds: float) -> float:
    """FLOPs per second in units of 1e12."""
    return flops / seconds / 1e12


def available_memory(device=None) -> int:
    """Bytes that ``device`` can still allocate.

    CUDA: free memory from ``torch.cuda.mem_get_info``. CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), else free physical pages from ``os.sysconf``.
    """
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def machine_name(device=None) -> str:
    """Short file-name-safe machine label: ``cpu-2core`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    device = _as_device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"cpu-{os.cpu_count()}core"
