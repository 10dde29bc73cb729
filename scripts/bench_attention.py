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
(``benchmarks.common.peak_memory``). FLOPs count only visible pairs (exactly, for
causal and masks); the backward counts 2.5x the forward, as the official benchmark does.
A configuration that would not fit in the device's free memory is refused before anything
is allocated, with the estimate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import checkout_path  # noqa: F401 (the checkout's flash_attn and benchmarks/)
import torch

from benchmarks.attention.case import (
    DTYPES,
    METHODS,
    MODES,
    Case,
    TooLargeError,
    format_result,
)
from benchmarks.attention.measure import profile_case, run_case
from benchmarks.attention.report import report
from benchmarks.attention.sweep import (
    GRIDS,
    load_results,
    save_results,
    sweep,
    sweep_environment,
)
from benchmarks.common import machine_name

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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


def run_sweep(args: argparse.Namespace, device: str) -> int:
    """--sweep: run the grid, save its raw JSON, write the report."""
    grid_name = args.grid or ("official" if device == "cuda" else "cpu")
    grid = GRIDS[grid_name]
    machine = args.machine or machine_name(device)
    env = sweep_environment(grid_name, device, args.backend, machine)
    results, memory_results = sweep(grid, device, args.backend)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = args.out_dir / f"attention_{env['machine']}.json"
    save_results(raw, results, memory_results, grid, env)
    print(f"wrote {raw}")
    report(args.out_dir, results, memory_results, grid, env)
    return 0


def run_one(args: argparse.Namespace, device: str) -> int:
    """One case from the size arguments (and its profile with --profile)."""
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


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.sweep:
        return run_sweep(args, device)
    if args.from_json:
        results, memory_results, grid, env = load_results(args.from_json)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report(args.out_dir, results, memory_results, grid, env)
        return 0
    return run_one(args, device)


if __name__ == "__main__":
    sys.exit(main())
