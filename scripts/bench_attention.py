"""Attention benchmark: time, TFLOP/s and peak memory of one configuration, or a sweep.

Methods (--type):
  flash      flash_attn.flash_attn_func (--backend auto|triton|torch; on CPU auto = torch,
             i.e. SDPA's fused path or the tiled reference)
  normal     standard attention: the (seqlen_q, seqlen_k) scores are materialised
  sdpa       torch.nn.functional.scaled_dot_product_attention
  reference  the FlashAttention paper's tiled algorithm in plain PyTorch (Python loops)

Modes: fwd (inference forward, no autograd graph), bwd (the backward of a forward run once
before timing), fwd_bwd (both; memory then is everything beyond the inputs: scores or tiles,
output, saved tensors, gradients).

    PYTHONPATH=. python scripts/bench_attention.py --b 1 --h 2 --q_len 4096 --kv_len 4096 \
        --d 64 --type normal --mode fwd_bwd --device cpu
    PYTHONPATH=. python scripts/bench_attention.py --sweep --grid cpu      # a few minutes
    PYTHONPATH=. python scripts/bench_attention.py --sweep --grid official # on a GPU

Peak memory is the most bytes live during a call beyond those live before it
(``flash_attn.utils.benchmark.peak_memory``). FLOPs count only visible pairs (exactly, for
causal and masks); the backward counts 2.5x the forward, as the official benchmark does.
A configuration that would not fit in the device's free memory is refused before anything
is allocated, with the estimate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flash_attn.ops.backend import resolve_backend
from flash_attn.ops.reference.attention import attention_ref
from flash_attn.ops.reference.attention_tiled import (
    attention_tiled,
)
from flash_attn.utils.benchmark import (
    attention_flops,
    available_memory,
    benchmark_time,
    machine_name,
    peak_memory,
    tflops,
)

METHODS = ("flash", "normal", "sdpa", "reference")
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# Sweeps. "official" is the grid of the official FlashAttention benchmark (hidden 2048, 16k
# tokens per batch); "cpu" shrinks it to a few minutes on a 2-core CPU. "memory" is a separate
# pass measuring fwd_bwd memory only, batch 1, to show how the saving grows with seqlen.
GRIDS = {
    "official": dict(
        headdims=[64, 128],
        hidden=2048,
        tokens=16384,
        seqlens=[512, 1024, 2048, 4096, 8192, 16384],
        causal=[False, True],
        modes=list(MODES),
        methods=["flash", "sdpa", "normal"],
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


class TooLargeError(RuntimeError):
    """The configuration would need more memory than the device has free."""


@dataclass
class Case:
    """One benchmark configuration (sizes as in flash_attn_func's layout)."""

    method: str = "flash"
    mode: str = "fwd"
    batch: int = 1
    nheads: int = 2
    nheads_k: int = 2
    seqlen_q: int = 1024
    seqlen_k: int = 1024
    headdim: int = 64
    causal: bool = False
    mask: str = "none"
    dtype: str = "fp32"
    device: str = "cpu"
    backend: str = "auto"
    block_m: int = 64
    block_n: int = 64

    def label(self) -> str:
        name = self.method
        if self.method == "flash":
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


# ----------------------------------------------------------------------------- one case


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
        raise TooLargeError(
            f"{case.method} {case.mode} at b={case.batch} h={case.nheads} "
            f"q_len={case.seqlen_q} kv_len={case.seqlen_k} d={case.headdim} {case.dtype} needs "
            f"about {need / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB is free on "
            f"{case.device}"
            + (
                " (standard attention stores batch*heads*q_len*kv_len scores)"
                if case.method == "normal"
                else ""
            )
            + ". Use smaller sizes, or --type flash."
        )


def _sdpa(q, k, v, causal, mask):
    # (B, S, H, D) -> (B, H, S, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    attn_mask, is_causal = mask, False
    if causal and mask is None and seqlen_q == seqlen_k:
        is_causal = True
    elif causal and mask is None:
        from torch.nn.attention.bias import causal_lower_right

        attn_mask = causal_lower_right(seqlen_q, seqlen_k)  # the project's alignment
    elif causal:
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        attn_mask = mask & (j <= i + (seqlen_k - seqlen_q))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)


def attention_fn(case: Case, mask: torch.Tensor | None):
    """fn(q, k, v) -> out for the case's method."""
    if case.method == "flash":
        if mask is not None:
            raise ValueError(
                "--type flash does not take --mask random: the kernels have no arbitrary mask "
                "(use --type reference, normal or sdpa)"
            )
        from flash_attn import flash_attn_func

        backend = case.backend
        return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal, backend=backend)
    if case.method == "normal":
        return lambda q, k, v: attention_ref(q, k, v, causal=case.causal, attn_bias=mask)[0]
    if case.method == "sdpa":
        return lambda q, k, v: _sdpa(q, k, v, case.causal, mask)
    if case.method == "reference":
        return lambda q, k, v: attention_tiled(
            q, k, v, causal=case.causal, mask=mask, block_m=case.block_m, block_n=case.block_n
        )
    raise ValueError(f"type must be one of {METHODS}, got {case.method!r}")


def make_step(case: Case):
    """Allocate the inputs; return (step, flops): step() runs the case's mode once."""
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")
    sizes = dict(
        b=case.batch,
        h=case.nheads,
        h_k=case.nheads_k,
        q_len=case.seqlen_q,
        kv_len=case.seqlen_k,
        d=case.headdim,
        block_m=case.block_m,
        block_n=case.block_n,
    )
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if case.nheads % case.nheads_k:
        raise ValueError(f"h ({case.nheads}) must be a multiple of h_k ({case.nheads_k})")
    if case.method == "flash":
        resolve_backend(case.backend, torch.device(case.device))  # ValueError if unservable
    check_fits(case)
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    grad = case.mode != "fwd"
    shape_q = (case.batch, case.seqlen_q, case.nheads, case.headdim)
    shape_k = (case.batch, case.seqlen_k, case.nheads_k, case.headdim)
    q, k, v = (
        torch.randn(s, device=device, dtype=dtype, requires_grad=grad)
        for s in (shape_q, shape_k, shape_k)
    )
    mask = None
    if case.mask == "random":
        mask = torch.rand(case.batch, case.nheads, case.seqlen_q, case.seqlen_k, device=device)
        mask = mask < 0.5
    fn = attention_fn(case, mask)
    flops = attention_flops(
        case.batch,
        case.nheads,
        case.seqlen_q,
        case.seqlen_k,
        case.headdim,
        causal=case.causal,
        mask=mask,
        mode=case.mode,
    )
    if case.mode == "fwd":

        def step():
            with torch.no_grad():
                fn(q, k, v)

    elif case.mode == "bwd":
        out = fn(q, k, v)
        dout = torch.randn_like(out)

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    else:
        dout = torch.randn(shape_q, device=device, dtype=dtype)

        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

    return step, flops


def run_case(
    case: Case, repeats: int = 3, warmup: int = 1, memory: bool = True, timing: bool = True
) -> Result:
    """Time (median of ``repeats``) and measure the peak memory of one case."""
    step, flops = make_step(case)
    result = Result(case)
    if timing:
        t = benchmark_time(step, warmup=warmup, repeats=repeats, device=case.device)
        result.time_s, result.tflops = t.median_s, tflops(flops, t.median_s)
    if memory:
        result.peak_bytes = peak_memory(step, device=case.device)
    return result


def profile_case(case: Case, trace_path: Path, repeats: int = 3, rows: int = 15) -> str:
    """Record a Chrome trace of ``repeats`` steps; return the table of the top operators."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(case)
    step()  # warmup outside the trace
    activities = [ProfilerActivity.CPU]
    if case.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            step()
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    sort = "self_cuda_time_total" if case.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def format_result(r: Result) -> str:
    parts = [r.case.label() + ":"]
    if r.note:
        return " ".join(parts + [r.note])
    if not math.isnan(r.time_s):
        parts.append(f"{r.time_s * 1e3:.2f} ms, {r.tflops:.3g} TFLOP/s")
    if r.peak_bytes is not None:
        parts.append(f"peak {r.peak_bytes / 2**20:.1f} MiB beyond live tensors")
    return " ".join(parts)


# ----------------------------------------------------------------------------- sweeps


def _safe_run(case, **kwargs) -> Result:
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


def sweep(grid: dict, device: str, backend: str, log=print) -> tuple[list, list]:
    """Run the timing grid and the memory pass; return (timing results, memory results)."""
    results = []
    for headdim in grid["headdims"]:
        nheads = grid["hidden"] // headdim
        for causal in grid["causal"]:
            for mode in grid["modes"]:
                for seqlen in grid["seqlens"]:
                    for method in grid["methods"]:
                        if seqlen > grid.get("max_seqlen", {}).get(method, seqlen):
                            continue
                        blocks = grid.get("reference_blocks", 64)
                        case = Case(
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
                        r = _safe_run(case, repeats=grid["repeats"], warmup=grid["warmup"])
                        log(format_result(r))
                        results.append(r)
    mem = grid["memory"]
    memory_results = []
    for seqlen in mem["seqlens"]:
        for method in mem["methods"]:
            case = Case(
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
            r = _safe_run(case, timing=False)
            log(format_result(r))
            memory_results.append(r)
    return results, memory_results


def _unit(results):
    best = max((r.tflops for r in results if not math.isnan(r.tflops)), default=0.0)
    return (1e3, "GFLOP/s") if best < 1.0 else (1.0, "TFLOP/s")


def _saving_rows(memory_results):
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


def write_markdown(path: Path, results, memory_results, grid, env, figures):
    """The sweep's tables (one per headdim, causal, mode), the memory table, the figures."""
    scale, unit = _unit(results)
    methods = list(dict.fromkeys(r.case.method for r in results))
    limits = "".join(
        f"; `{m}` only up to seqlen {n}" for m, n in grid.get("max_seqlen", {}).items()
    )
    lines = [
        f"# Attention benchmark: {env['machine']}",
        "",
        f"Generated by `PYTHONPATH=. python scripts/bench_attention.py --sweep --grid"
        f" {env['grid_name']} --device {env['device']}` on {env['date']}.",
        "",
        f"- machine: {env['description']}",
        f"- torch {env['torch']}, {env['threads']} threads, dtype {grid['dtype']}"
        + (
            f"; load average {env['load_average']:.1f} when the sweep started"
            " (other processes compete for the cores: times are noisy, memory is not)"
            if env.get("load_average") is not None and env["device"] == "cpu"
            else ""
        ),
        f"- hidden {grid['hidden']} (nheads = hidden / headdim), batch = {grid['tokens']} / seqlen,"
        f" median of {grid['repeats']} runs after {grid['warmup']} warmup",
        f"- `flash` = flash_attn_func ({env['flash_backend']} backend), `sdpa` ="
        " F.scaled_dot_product_attention, `normal` = standard attention (materialised scores),"
        f" `reference` = the paper's tiled algorithm in PyTorch{limits}",
        f"- cells: {unit} / milliseconds / peak MiB beyond the inputs"
        " (FLOPs count visible pairs only; bwd = 2.5x fwd)",
        "",
    ]
    keys = list(dict.fromkeys((r.case.headdim, r.case.causal, r.case.mode) for r in results))
    for headdim, causal, mode in keys:
        lines += [f"## headdim {headdim}, causal={causal}, {mode}", ""]
        lines.append("| seqlen | batch | " + " | ".join(methods) + " |")
        lines.append("|---:|---:|" + "---:|" * len(methods))
        group = [
            r
            for r in results
            if (r.case.headdim, r.case.causal, r.case.mode) == (headdim, causal, mode)
        ]
        for seqlen in dict.fromkeys(r.case.seqlen_q for r in group):
            row = {r.case.method: r for r in group if r.case.seqlen_q == seqlen}
            batch = next(iter(row.values())).case.batch
            cells = []
            for m in methods:
                r = row.get(m)
                if r is None or r.note:
                    cells.append("skipped" if r is not None else "")
                else:
                    mib = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-"
                    cells.append(f"{r.tflops * scale:.1f} / {r.time_s * 1e3:.1f} / {mib}")
            lines.append(f"| {seqlen} | {batch} | " + " | ".join(cells) + " |")
        lines.append("")
    mem = grid["memory"]
    lines += [
        "## Memory of forward + backward",
        "",
        f"Extra memory of one forward + backward (fwd_bwd) beyond q, k, v and dout: output,"
        f" saved tensors, workspace, gradients. batch {mem['batch']}, {mem['nheads']} heads,"
        f" headdim {mem['headdim']}, {mem['dtype']}, not causal. Saving = standard attention's"
        " memory / the method's.",
        "",
    ]
    mem_methods = [m for m in mem["methods"] if m != "normal"]
    lines.append(
        "| seqlen | normal (MiB) | "
        + " | ".join(f"{m} (MiB) | saving {m}" for m in mem_methods)
        + " |"
    )
    lines.append("|---:|---:|" + "---:|---:|" * len(mem_methods))
    for seqlen, here, saving in _saving_rows(memory_results):
        cells = [f"{here['normal'] / 2**20:.1f}" if "normal" in here else "skipped"]
        for m in mem_methods:
            cells.append(f"{here[m] / 2**20:.1f}" if m in here else "skipped")
            cells.append(f"{saving[m]:.1f}x" if m in saving else "-")
        lines.append(f"| {seqlen} | " + " | ".join(cells) + " |")
    skipped = [r for r in results + memory_results if r.note]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {r.case.label()}: {r.note}" for r in skipped]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path.write_text("\n".join(lines) + "\n")


def _machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def plot_throughput(results, out_dir: Path, machine: str) -> list[Path]:
    """One PNG per (headdim, causal): a panel per mode, bars per method per seqlen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = _unit(results)
    methods = list(dict.fromkeys(r.case.method for r in results))
    paths = []
    for headdim, causal in dict.fromkeys((r.case.headdim, r.case.causal) for r in results):
        modes = [m for m in MODES if any(r.case.mode == m for r in results)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            group = [
                r
                for r in results
                if (r.case.headdim, r.case.causal, r.case.mode) == (headdim, causal, mode)
            ]
            seqlens = list(dict.fromkeys(r.case.seqlen_q for r in group))
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                values = []
                for s in seqlens:
                    r = next(
                        (r for r in group if r.case.seqlen_q == s and r.case.method == method), None
                    )
                    ok = r is not None and not r.note and not math.isnan(r.tflops)
                    values.append(r.tflops * scale if ok else math.nan)
                xs = [x + (i - (len(methods) - 1) / 2) * width for x in range(len(seqlens))]
                heights = [0.0 if math.isnan(y) else y for y in values]
                bars = ax.bar(xs, heights, width, label=method)
                labels = [
                    "" if math.isnan(y) else f"{y:.0f}" if y >= 10 else f"{y:.1f}" for y in values
                ]
                ax.bar_label(bars, labels=labels, fontsize=6)
            ax.set_xticks(
                range(len(seqlens)), [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens]
            )
            ax.set_xlabel("sequence length")
            ax.set_ylabel(unit)
            ax.set_title(mode)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Attention {unit}, {machine}, headdim {headdim}, causal={causal}")
        fig.tight_layout()
        path = out_dir / f"attention_{machine}_d{headdim}_{'causal' if causal else 'full'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_memory(memory_results, out_dir: Path, machine: str) -> Path:
    """Extra fwd+bwd memory per method vs seqlen (log scale), and the saving factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _saving_rows(memory_results)
    methods = list(dict.fromkeys(r.case.method for r in memory_results))
    fig, (ax_mem, ax_save) = plt.subplots(1, 2, figsize=(11, 4))
    for k, method in enumerate(methods):
        pts = [(s, here[method] / 2**20) for s, here, _ in rows if method in here]
        if pts:
            ax_mem.plot(*zip(*pts), marker="o", label=method)
        pts = [(s, saving[method]) for s, _, saving in rows if method in saving]
        if pts:
            ax_save.plot(*zip(*pts), marker="o", label=f"{method} vs normal")
            for s, f in pts:
                # the first method's labels above its points, the others' below
                ax_save.annotate(
                    f"{f:.0f}x",
                    (s, f),
                    textcoords="offset points",
                    xytext=(0, 6 if k == 0 else -12),
                    ha="center",
                    fontsize=8,
                )
    seqlens = [s for s, _, _ in rows]
    for ax in (ax_mem, ax_save):
        # log-log: a saving that grows linearly with seqlen is a straight line of slope 1
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
        ax.minorticks_off()
        ax.margins(y=0.15)
        ax.set_xlabel("sequence length")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax_mem.set_ylabel("extra memory of fwd + bwd (MiB)")
    ax_mem.set_title("memory beyond the inputs")
    ax_save.set_ylabel("standard attention memory / method memory")
    ax_save.set_title("memory saving (x)")
    case = memory_results[0].case
    fig.suptitle(
        f"Attention fwd+bwd memory, {machine}, b={case.batch} h={case.nheads} "
        f"d={case.headdim} {case.dtype}"
    )
    fig.tight_layout()
    path = out_dir / f"attention_{machine}_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_results(path: Path, results, memory_results, grid, env) -> None:
    """Raw results as JSON, so tables and figures can be redrawn (--from_json)."""

    def rows(rs):
        return [
            dict(
                case=asdict(r.case),
                time_s=r.time_s,
                tflops=r.tflops,
                peak_bytes=r.peak_bytes,
                note=r.note,
            )
            for r in rs
        ]

    data = dict(env=env, grid=grid, results=rows(results), memory=rows(memory_results))
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_results(path: Path):
    """Inverse of :func:`save_results`: (results, memory_results, grid, env)."""
    data = json.loads(Path(path).read_text())

    def rows(rs):
        return [
            Result(
                Case(**r["case"]),
                time_s=r["time_s"],
                tflops=r["tflops"],
                peak_bytes=r["peak_bytes"],
                note=r["note"],
            )
            for r in rs
        ]

    return rows(data["results"]), rows(data["memory"]), data["grid"], data["env"]


def report(out_dir: Path, results, memory_results, grid, env) -> None:
    """Write attention_<machine>.md and its PNG figures into out_dir."""
    machine = env["machine"]
    figures = []
    try:
        figures = plot_throughput(results, out_dir, machine)
        if any(r.peak_bytes is not None for r in memory_results):
            figures.append(plot_memory(memory_results, out_dir, machine))
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)")
    md = out_dir / f"attention_{machine}.md"
    write_markdown(md, results, memory_results, grid, env, figures)
    print(f"wrote {md}" + "".join(f"\nwrote {p}" for p in figures))


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--b", type=int, default=1, help="batch size")
    p.add_argument("--h", type=int, default=2, help="query heads")
    p.add_argument("--h_k", type=int, default=None, help="key/value heads (GQA); default --h")
    p.add_argument("--q_len", type=int, default=16384)
    p.add_argument("--kv_len", type=int, default=16384)
    p.add_argument("--d", type=int, default=512, help="head dim")
    p.add_argument("--type", choices=METHODS, default="flash")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--mask", choices=["none", "random"], default="none")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu"
    )
    p.add_argument("--mode", choices=MODES, default="fwd")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 10 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "triton", "torch"],
        default="auto",
        help="backend of --type flash",
    )
    p.add_argument("--block_m", type=int, default=64, help="query block of --type reference")
    p.add_argument("--block_n", type=int, default=64, help="key block of --type reference")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory run")
    p.add_argument(
        "--profile",
        action="store_true",
        help="record a Chrome trace (see --trace) and print the top operators",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="trace file (default attention_<type>_<mode>_trace.json)",
    )
    p.add_argument("--sweep", action="store_true", help="run a grid (see --grid)")
    p.add_argument(
        "--grid",
        choices=list(GRIDS),
        default=None,
        help="official: the official benchmark's grid; cpu: a few minutes on 2 cores."
        " Default: official on cuda, cpu on cpu",
    )
    p.add_argument(
        "--out_dir",
        type=Path,
        default=RESULTS_DIR,
        help="where --sweep writes attention_<machine>.md and PNGs",
    )
    p.add_argument("--machine", default=None, help="name in the output files (default: detected)")
    p.add_argument(
        "--from_json",
        type=Path,
        default=None,
        help="redraw the table and figures of a sweep from its attention_<machine>.json",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.sweep:
        grid_name = args.grid or ("official" if device == "cuda" else "cpu")
        grid = GRIDS[grid_name]
        env = sweep_environment(
            grid_name, device, args.backend, args.machine or machine_name(device)
        )
        results, memory_results = sweep(grid, device, args.backend)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        raw = args.out_dir / f"attention_{env['machine']}.json"
        save_results(raw, results, memory_results, grid, env)
        print(f"wrote {raw}")
        report(args.out_dir, results, memory_results, grid, env)
        return 0
    if args.from_json:
        results, memory_results, grid, env = load_results(args.from_json)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report(args.out_dir, results, memory_results, grid, env)
        return 0

    case = Case(
        method=args.type,
        mode=args.mode,
        batch=args.b,
        nheads=args.h,
        nheads_k=args.h_k or args.h,
        seqlen_q=args.q_len,
        seqlen_k=args.kv_len,
        headdim=args.d,
        causal=args.causal,
        mask=args.mask,
        dtype=args.dtype or ("fp16" if device == "cuda" else "fp32"),
        device=device,
        backend=args.backend,
        block_m=args.block_m,
        block_n=args.block_n,
    )
    repeats = args.repeats or (10 if device == "cuda" else 3)
    try:
        if args.profile:
            trace = args.trace or Path(f"attention_{args.type}_{args.mode}_trace.json")
            print(profile_case(case, trace, repeats=repeats))
            print(f"wrote Chrome trace {trace} (open in chrome://tracing or ui.perfetto.dev)")
        result = run_case(case, repeats=repeats, warmup=args.warmup, memory=not args.no_memory)
    except (TooLargeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory although the estimate fitted: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
