"""The sweep grids, running one, and its raw results as JSON (so reports can be redrawn)."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.attention.case import (
    MODES,
    Case,
    Result,
    TooLargeError,
    format_result,
)
from benchmarks.attention.measure import run_case
from flash_attn.ops.backend import resolve_backend

# "official" is the grid of the official FlashAttention benchmark (hidden 2048, 16k tokens per
# batch); "cpu" shrinks it to a few minutes on a 2-core CPU. "memory" is a separate pass
# measuring fwd_bwd memory only, batch 1, to show how the saving grows with seqlen.
GRIDS = {
    "official": dict(
        headdims=[64, 128],
        hidden=2048,
        tokens=16384,
        seqlens=[512, 1024, 2048, 4096, 8192, 16384],
        causal=[False, True],
        modes=list(MODES),
        methods=["flash", "flash_deterministic", "sdpa"],
        dtype="fp16",
        repeats=30,
        warmup=3,
        memory=dict(
            batch=1,
            nheads=16,
            headdim=128,
            seqlens=[1024, 2048, 4096, 8192, 16384],
            methods=["flash", "sdpa", "normal"],
            dtype="fp16",
        ),
    ),
    "cpu": dict(
        headdims=[64],
        hidden=256,
        tokens=4096,
        seqlens=[512, 1024, 2048, 4096],
        causal=[False, True],
        modes=list(MODES),
        methods=["flash", "sdpa", "normal", "reference"],
        dtype="fp32",
        repeats=3,
        warmup=1,
        # The tiled reference runs its loops in Python: 128x128 tiles, and only up to 2k.
        reference_blocks=128,
        max_seqlen={"reference": 2048},
        memory=dict(
            batch=1,
            nheads=4,
            headdim=64,
            seqlens=[1024, 2048, 4096, 8192],
            methods=["flash", "reference", "normal"],
            dtype="fp32",
        ),
    ),
}


def _safe_run(case: Case, **kwargs) -> Result:
    try:
        return run_case(case, **kwargs)
    except TooLargeError as e:
        return Result(case, note=f"skipped: {e}")
    except torch.OutOfMemoryError:
        return Result(case, note="skipped: out of memory")
    except ValueError as e:
        return Result(case, note=f"skipped: {e}")
    except Exception as e:  # a failing entry (e.g. a kernel's resources) must not end a sweep
        return Result(case, note=f"failed: {type(e).__name__}: {e}")


def _timing_cases(grid: dict, device: str, backend: str):
    """The grid's cases in table order: headdim, causal, mode, seqlen, method."""
    blocks = grid.get("reference_blocks", 64)
    axes = (grid[k] for k in ("headdims", "causal", "modes", "seqlens", "methods"))
    for headdim, causal, mode, seqlen, method in itertools.product(*axes):
        if seqlen > grid.get("max_seqlen", {}).get(method, seqlen):
            continue
        nheads = grid["hidden"] // headdim
        yield Case(
            method=method,
            mode=mode,
            batch=max(1, grid["tokens"] // seqlen),
            nheads=nheads,
            nheads_k=nheads,
            seqlen_q=seqlen,
            seqlen_k=seqlen,
            headdim=headdim,
            causal=causal,
            dtype=grid["dtype"],
            device=device,
            backend=backend,
            block_m=blocks,
            block_n=blocks,
        )


def _memory_cases(grid: dict, device: str, backend: str):
    mem = grid["memory"]
    for seqlen, method in itertools.product(mem["seqlens"], mem["methods"]):
        yield Case(
            method=method,
            mode="fwd_bwd",
            batch=mem["batch"],
            nheads=mem["nheads"],
            nheads_k=mem["nheads"],
            seqlen_q=seqlen,
            seqlen_k=seqlen,
            headdim=mem["headdim"],
            dtype=mem["dtype"],
            device=device,
            backend=backend,
            block_m=128,
            block_n=128,
        )


def sweep(grid: dict, device: str, backend: str, log=print) -> tuple[list, list]:
    """Run the timing grid and the memory pass; return (timing results, memory results)."""
    results, memory_results = [], []
    for case in _timing_cases(grid, device, backend):
        results.append(_safe_run(case, repeats=grid["repeats"], warmup=grid["warmup"]))
        log(format_result(results[-1]))
    for case in _memory_cases(grid, device, backend):
        memory_results.append(_safe_run(case, timing=False))
        log(format_result(memory_results[-1]))
    return results, memory_results


def _machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def sweep_environment(grid_name: str, device: str, backend: str, machine: str) -> dict:
    """What the tables need to say about where and how they were measured."""
    return dict(
        grid_name=grid_name,
        device=device,
        machine=machine,
        description=_machine_description(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=str(datetime.date.today()),
        flash_backend=resolve_backend(backend, torch.device(device)),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def save_results(path: Path, results, memory_results, grid, env) -> None:
    """Raw results as JSON, so tables and figures can be redrawn (--from_json)."""

    rows = [asdict(r) for r in results], [asdict(r) for r in memory_results]
    data = dict(env=env, grid=grid, results=rows[0], memory=rows[1])
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_results(path: Path):
    """Inverse of :func:`save_results`: (results, memory_results, grid, env)."""
    data = json.loads(Path(path).read_text())

    def rows(rs):
        return [Result(**{**r, "case": Case(**r["case"])}) for r in rs]

    return rows(data["results"]), rows(data["memory"]), data["grid"], data["env"]
