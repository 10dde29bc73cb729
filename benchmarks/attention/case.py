"""One attention benchmark configuration, what it measured, and whether it fits in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks.common import available_memory
from flash_attn.ops.backend import resolve_backend

# flash_deterministic: flash_attn_func with deterministic=True (its bit-reproducible backward).
METHODS = ("flash", "flash_deterministic", "normal", "sdpa", "reference")
FLASH = ("flash", "flash_deterministic")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TooLargeError(RuntimeError):
    """The configuration would need more memory than the device has free."""


@dataclass
class Case:
    """One benchmark configuration: sizes in flash_attn_func's (batch, seqlen, nheads, headdim)
    layout; method in METHODS, mode in MODES, dtype a key of DTYPES; backend is that of
    ``flash``, block_m / block_n the tiles of ``reference``."""

    method: str
    mode: str
    batch: int
    nheads: int
    nheads_k: int
    seqlen_q: int
    seqlen_k: int
    headdim: int
    dtype: str
    device: str
    causal: bool = False
    mask: str = "none"  # "none" | "random" (a bool mask of half the pairs)
    backend: str = "auto"
    block_m: int = 64
    block_n: int = 64

    def label(self) -> str:
        name = self.method
        if self.method in FLASH:
            try:
                backend = resolve_backend(self.backend, torch.device(self.device))
            except ValueError:  # reported where the case runs
                backend = self.backend
            name += f" ({backend} backend)"
        return (
            f"{name} {self.mode} b={self.batch} h={self.nheads}/{self.nheads_k} "
            f"q_len={self.seqlen_q} kv_len={self.seqlen_k} d={self.headdim} "
            f"causal={self.causal} mask={self.mask} {self.dtype} {self.device}"
        )


@dataclass
class Result:
    """What one case measured: median seconds, TFLOP/s, peak bytes beyond live tensors."""

    case: Case
    time_s: float = math.nan
    tflops: float = math.nan
    peak_bytes: int | None = None
    note: str = ""  # why the case was skipped or failed, empty when it ran


def format_result(r: Result) -> str:
    """One line: the case's label, then its time and TFLOP/s, peak memory, or why it did not run."""
    parts = [r.case.label() + ":"]
    if r.note:
        return " ".join(parts + [r.note])
    if not math.isnan(r.time_s):
        parts.append(f"{r.time_s * 1e3:.2f} ms, {r.tflops:.3g} TFLOP/s")
    if r.peak_bytes is not None:
        parts.append(f"peak {r.peak_bytes / 2**20:.1f} MiB beyond live tensors")
    return " ".join(parts)


def throughput_unit(results: list[Result]) -> tuple[float, str]:
    """(scale, unit) for tables and plots: GFLOP/s when every rate is below 1 TFLOP/s."""
    best = max((r.tflops for r in results if not math.isnan(r.tflops)), default=0.0)
    return (1e3, "GFLOP/s") if best < 1.0 else (1.0, "TFLOP/s")


def memory_saving_rows(memory_results: list[Result]) -> list[tuple[int, dict, dict]]:
    """[(seqlen, {method: bytes}, {method: normal_bytes / bytes})] for the memory pass."""
    rows = []
    for seqlen in sorted({r.case.seqlen_q for r in memory_results}):
        here = {
            r.case.method: r.peak_bytes
            for r in memory_results
            if r.case.seqlen_q == seqlen and r.peak_bytes is not None
        }
        normal = here.get("normal")
        saving = {m: normal / b for m, b in here.items() if normal and b and m != "normal"}
        rows.append((seqlen, here, saving))
    return rows


def estimate_bytes(case: Case) -> int:
    """Rough upper estimate of the memory a case allocates (inputs included)."""
    elt = DTYPES[case.dtype].itemsize
    grad = case.mode != "fwd"
    n_q = case.batch * case.seqlen_q * case.nheads * case.headdim
    n_k = case.batch * case.seqlen_k * case.nheads_k * case.headdim
    n_scores = case.batch * case.nheads * case.seqlen_q * case.seqlen_k
    total = elt * (2 * n_q + 2 * n_k)  # q, k, v, out
    if grad:
        total += elt * (2 * n_q + 2 * n_k)  # dout, dq, dk, dv
    if case.mask != "none":
        total += n_scores  # the bool mask
    materialises = case.method == "normal" or (case.method == "sdpa" and case.mask != "none")
    if materialises:
        # scores and probabilities (+ their gradients in the backward); fp16 inputs may be
        # upcast, so count 4 bytes per element.
        total += n_scores * max(elt, 4) * (5 if grad else 3)
        total += 2 * elt * n_k * (case.nheads // case.nheads_k)  # k, v repeated for GQA
    else:
        total += 8 * case.batch * case.nheads * case.seqlen_q  # lse, delta
        if case.method == "reference":
            total += 8 * 4 * case.batch * case.nheads * case.block_m * case.block_n  # tiles
    return total


def check_fits(case: Case) -> None:
    """Raise TooLargeError, with the estimate, when the case cannot fit in free memory."""
    need = estimate_bytes(case)
    free = available_memory(case.device)
    if need > 0.9 * free:
        why = " (standard attention stores batch*heads*q_len*kv_len scores)"
        raise TooLargeError(
            f"{case.method} {case.mode} at b={case.batch} h={case.nheads} "
            f"q_len={case.seqlen_q} kv_len={case.seqlen_k} d={case.headdim} {case.dtype} needs "
            f"about {need / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB is free on "
            f"{case.device}" + (why if case.method == "normal" else "") + ". Use smaller sizes, "
            "or --type flash."
        )
