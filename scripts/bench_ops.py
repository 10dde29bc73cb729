"""Fused ops against PyTorch eager and torch.compile of the reference: time and peak memory.

Every measurement is one forward + backward step. Variants per op:
  flash_attn   the op's functional API, backend auto (Triton on CUDA; on CPU the torch
               backend, i.e. the reference or, for linear cross-entropy, the chunked Function)
  eager        the same computation from PyTorch built-ins (F.cross_entropy, F.linear, F.gelu,
               F.layer_norm, F.rms_norm; for rotary, Hugging Face's rotate_half formula)
  reference    the op's plain-PyTorch reference run eagerly (layer_norm, rms_norm, rotary)
  compiled     torch.compile (inductor) of the op's plain-PyTorch reference

Peak memory is the most bytes live during a step beyond those live before it
(``benchmarks.common.peak_memory``: CUDA's allocator counters on a GPU; on CPU the
allocation events of ``torch.profiler(profile_memory=True)`` replayed in time order).

The key figure (--figure, on by default) is linear cross-entropy at 8192 tokens x 50257 vocab x
hidden 768 (fp32, forward + backward) against ``lm_head`` + ``F.cross_entropy``: peak memory by
the profiler replay and, independently, by a fresh subprocess per variant that reads the rise of
``ru_maxrss`` over its resident size before the step (CPU only), plus the two losses.

    PYTHONPATH=. python scripts/bench_ops.py                 # table + key figure
    PYTHONPATH=. python scripts/bench_ops.py --cases mlp cross_entropy --no-figure

Writes benchmarks/results/ops_<machine>.md. To add an op, write a function
``(device, dtype, large) -> Case`` and put it in ``CASES``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# The profiler's C++ side logs every start/stop to stderr unless told otherwise.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import checkout_path  # noqa: E402, F401 (the checkout's flash_attn and benchmarks/)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    available_memory,
    benchmark_time,
    machine_name,
    peak_memory,
)
from flash_attn.ops.backend import resolve_backend  # noqa: E402
from flash_attn.ops.cross_entropy import cross_entropy_loss  # noqa: E402
from flash_attn.ops.cross_entropy.reference import cross_entropy_ref  # noqa: E402
from flash_attn.ops.layer_norm import layer_norm_fn  # noqa: E402
from flash_attn.ops.layer_norm.reference import layer_norm_ref  # noqa: E402
from flash_attn.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from flash_attn.ops.linear_cross_entropy.reference import linear_cross_entropy_ref  # noqa: E402
from flash_attn.ops.mlp import fused_mlp  # noqa: E402
from flash_attn.ops.mlp.reference import mlp_ref  # noqa: E402
from flash_attn.ops.rotary import apply_rotary  # noqa: E402
from flash_attn.ops.rotary.reference import apply_rotary_ref  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MB = 2**20


@dataclass
class Case:
    """One op at one size: a step (forward + backward, no arguments) per variant."""

    shape: str
    steps: dict[str, Callable[[], object]]


def _leaf(*shape, device, dtype, scale=1.0):
    return (
        (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()
    )


def _step(fn, *inputs):
    """A step that runs fn(*inputs) and backpropagates the sum of its output."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        fn(*inputs).sum().backward()
        # Dropped here, not at the start: a gradient left from the previous step and freed
        # inside the measured one would lower its peak by its own size.
        for t in leaves:
            t.grad = None

    return step


def _variants(ours, eager, reference, *inputs) -> dict[str, Callable[[], object]]:
    return {
        "flash_attn": _step(ours, *inputs),
        "eager": _step(eager, *inputs),
        "compiled": _step(torch.compile(reference), *inputs),
    }


def cross_entropy_case(device, dtype, large) -> Case:
    tokens, vocab = (8192, 50257) if large else (1024, 50257)
    logits = _leaf(tokens, vocab, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    return Case(
        f"tokens={tokens} vocab={vocab}",
        _variants(cross_entropy_loss, F.cross_entropy, cross_entropy_ref, logits, labels),
    )


def linear_cross_entropy_case(device, dtype, large) -> Case:
    tokens, hidden, vocab = (8192, 768, 50257) if large else (1024, 768, 50257)
    h = _leaf(tokens, hidden, device=device, dtype=dtype)
    weight = _leaf(vocab, hidden, device=device, dtype=dtype, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), device=device)

    def eager(h, weight, labels):
        return F.cross_entropy(F.linear(h, weight), labels)

    return Case(
        f"tokens={tokens} hidden={hidden} vocab={vocab}",
        _variants(linear_cross_entropy, eager, linear_cross_entropy_ref, h, weight, labels),
    )


def _mlp_case(device, dtype, large, gated):
    tokens, d_model = (8192, 1024) if large else (2048, 768)
    d_hidden = 8 * d_model // 3 if gated else 4 * d_model
    activation = "silu" if gated else "gelu_approx"
    x = _leaf(tokens, d_model, device=device, dtype=dtype)
    fc1_w = _leaf(
        2 * d_hidden if gated else d_hidden, d_model, device=device, dtype=dtype, scale=0.02
    )
    fc1_b = _leaf(fc1_w.shape[0], device=device, dtype=dtype, scale=0.02)
    fc2_w = _leaf(d_model, d_hidden, device=device, dtype=dtype, scale=0.02)
    fc2_b = _leaf(d_model, device=device, dtype=dtype, scale=0.02)

    def ours(*args):
        return fused_mlp(*args, activation, gated)

    def eager(x, fc1_w, fc1_b, fc2_w, fc2_b):
        y = F.linear(x, fc1_w, fc1_b)
        if gated:
            up, gate = y.chunk(2, dim=-1)
            return F.linear(up * F.silu(gate), fc2_w, fc2_b)
        return F.linear(F.gelu(y, approximate="tanh"), fc2_w, fc2_b)

    def reference(*args):
        return mlp_ref(*args, activation, gated)

    return Case(
        f"tokens={tokens} d={d_model} hidden={d_hidden} {activation}",
        _variants(ours, eager, reference, x, fc1_w, fc1_b, fc2_w, fc2_b),
    )


def mlp_case(device, dtype, large) -> Case:
    return _mlp_case(device, dtype, large, gated=False)


def gated_mlp_case(device, dtype, large) -> Case:
    return _mlp_case(device, dtype, large, gated=True)


def _with_reference(steps, reference, *inputs):
    """Add the eagerly run reference, between eager and compiled."""
    compiled = steps.pop("compiled")
    return {**steps, "reference": _step(reference, *inputs), "compiled": compiled}


def _norm_case(device, dtype, large, is_rms_norm):
    tokens, hidden = (16384, 4096) if large else (4096, 1024)
    x = _leaf(tokens, hidden, device=device, dtype=dtype)
    residual = _leaf(tokens, hidden, device=device, dtype=dtype)
    weight = _leaf(hidden, device=device, dtype=dtype)
    bias = None if is_rms_norm else _leaf(hidden, device=device, dtype=dtype)

    # out = norm(x + residual): the residual add is fused into the kernel.
    def ours(x, residual, weight, bias):
        return layer_norm_fn(x, weight, bias, residual, is_rms_norm=is_rms_norm)

    def eager(x, residual, weight, bias):
        if is_rms_norm:
            return F.rms_norm(x + residual, (hidden,), weight, 1e-5)
        return F.layer_norm(x + residual, (hidden,), weight, bias, 1e-5)

    def reference(x, residual, weight, bias):
        return layer_norm_ref(x, weight, bias, residual, is_rms_norm=is_rms_norm)

    inputs = (x, residual, weight, bias)
    steps = _variants(ours, eager, reference, *inputs)
    return Case(
        f"tokens={tokens} hidden={hidden} +residual", _with_reference(steps, reference, *inputs)
    )


def layer_norm_case(device, dtype, large) -> Case:
    return _norm_case(device, dtype, large, is_rms_norm=False)


def rms_norm_case(device, dtype, large) -> Case:
    return _norm_case(device, dtype, large, is_rms_norm=True)


def rotary_case(device, dtype, large) -> Case:
    batch, seqlen, nheads, headdim = (8, 2048, 32, 128) if large else (2, 1024, 16, 64)
    q = _leaf(batch, seqlen, nheads, headdim, device=device, dtype=dtype)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, headdim, 2, device=device) / headdim)
    freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)  # (seqlen, headdim / 2)

    def eager(q, cos, sin):
        # Hugging Face's formula: q * cos + rotate_half(q) * sin, tables repeated to headdim.
        cos_full = torch.cat((cos, cos), -1)[None, :, None, :]
        sin_full = torch.cat((sin, sin), -1)[None, :, None, :]
        q1, q2 = q.chunk(2, dim=-1)
        return q * cos_full + torch.cat((-q2, q1), dim=-1) * sin_full

    inputs = (q, cos, sin)
    steps = _variants(apply_rotary, eager, apply_rotary_ref, *inputs)
    return Case(
        f"q=({batch}, {seqlen}, {nheads}, {headdim})",
        _with_reference(steps, apply_rotary_ref, *inputs),
    )


# name -> (device, dtype, large) -> Case. ``large`` is the GPU size, small is the CPU size.
CASES: dict[str, Callable[[torch.device, torch.dtype, bool], Case]] = {
    "cross_entropy": cross_entropy_case,
    "linear_cross_entropy": linear_cross_entropy_case,
    "mlp": mlp_case,
    "gated_mlp": gated_mlp_case,
    "layer_norm": layer_norm_case,
    "rms_norm": rms_norm_case,
    "rotary": rotary_case,
}


def run_table(names, device, dtype, large, repeats, log=print) -> list[dict]:
    rows = []
    for name in names:
        case = CASES[name](device, dtype, large)
        for variant, step in case.steps.items():
            # Warm-up (compilation, autotuning) happens inside benchmark_time.
            timing = benchmark_time(step, warmup=1, repeats=repeats, device=device)
            peak = peak_memory(step, device=device)
            row = dict(
                case=name,
                variant=variant,
                shape=case.shape,
                ms=timing.median_s * 1e3,
                peak_mb=peak / MB,
            )
            rows.append(row)
            log(
                f"{name:22s} {variant:11s} {case.shape:40s} {row['ms']:10.1f} ms "
                f"{row['peak_mb']:9.1f} MB"
            )
        del case
    return rows


# ---- key figure: linear cross-entropy memory at GPT-2 scale ----

FIGURE_SIZE = dict(tokens=8192, hidden=768, vocab=50257)
FIGURE_VARIANTS = ("linear_cross_entropy", "lm_head + F.cross_entropy")


def _figure_inputs(device):
    gen = torch.Generator().manual_seed(0)
    t, h, v = FIGURE_SIZE["tokens"], FIGURE_SIZE["hidden"], FIGURE_SIZE["vocab"]
    # Built in place: a temporary here would raise the RSS probe's peak before its step.
    hidden = torch.randn(t, h, generator=gen).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul_(h**-0.5).to(device).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=gen).to(device)
    return hidden, weight, labels


def _figure_step(variant, hidden, weight, labels, losses):
    def step():
        if variant == "linear_cross_entropy":
            loss = linear_cross_entropy(hidden, weight, labels)
        else:
            loss = F.cross_entropy(hidden @ weight.t(), labels)
        loss.backward()
        losses.append(loss.item())
        hidden.grad = weight.grad = None  # see _step

    return step


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_probe(variant: str) -> None:
    """Child process: one step of ``variant``, prints the rise of peak RSS over the start."""
    hidden, weight, labels = _figure_inputs("cpu")
    losses = []
    # Warm-up on 256 tokens: the first step maps library code and thread buffers (hundreds of
    # MB of RSS) that would otherwise be charged to the variant measured.
    _figure_step(variant, hidden[:256].detach().requires_grad_(), weight, labels[:256], [])()
    step = _figure_step(variant, hidden, weight, labels, losses)
    before = _rss_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux: the process's peak resident size so far.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(rise=peak - before, before=before, loss=losses[0], seconds=seconds)))


def run_figure(device, log=print) -> dict:
    t, h, v = FIGURE_SIZE["tokens"], FIGURE_SIZE["hidden"], FIGURE_SIZE["vocab"]
    need = 3 * t * v * 4 + 4 * v * h * 4
    if available_memory(device) < need:
        raise SystemExit(f"key figure needs about {need / 2**30:.1f} GiB free on {device}")
    inputs = _figure_inputs(device)
    out = dict(size=FIGURE_SIZE, variants={})
    for variant in FIGURE_VARIANTS:
        losses = []
        step = _figure_step(variant, *inputs, losses)
        timing = benchmark_time(step, warmup=0, repeats=1, device=device)
        peak = peak_memory(step, device=device)
        res = dict(ms=timing.median_s * 1e3, peak_mb=peak / MB, loss=losses[0])
        if device.type == "cpu":
            child = subprocess.run(
                [sys.executable, __file__, "--rss-probe", variant],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": "."},
                cwd=Path(__file__).resolve().parents[1],
            )
            probe = json.loads(child.stdout.strip().splitlines()[-1])
            res["rss_rise_mb"] = probe["rise"] / MB
            res["rss_loss"] = probe["loss"]
            # Two timed steps (here and in the probe): keep the faster, less disturbed one.
            res["ms"] = min(res["ms"], probe["seconds"] * 1e3)
        out["variants"][variant] = res
        log(f"figure {variant:28s} {json.dumps(res)}")
    ours, base = (out["variants"][k] for k in FIGURE_VARIANTS)
    out["loss_diff"] = abs(ours["loss"] - base["loss"])
    out["ratio_profiler"] = base["peak_mb"] / ours["peak_mb"]
    if "rss_rise_mb" in ours:
        out["ratio_rss"] = base["rss_rise_mb"] / ours["rss_rise_mb"]
    ratio_rss = out.get("ratio_rss", float("nan"))
    log(
        f"figure ratios: profiler {out['ratio_profiler']:.1f}x rss {ratio_rss:.1f}x, "
        f"loss diff {out['loss_diff']:.2e}"
    )
    return out


# ---- report ----


def _machine_description(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def write_markdown(path, rows, figure, machine, device, dtype_name, backend) -> None:
    lines = [
        f"# Fused ops benchmark: {machine}",
        "",
        f"Machine: **{machine}** ({_machine_description(device)}); torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"flash_attn backend on this device: `{backend}`. One step = forward + backward.",
        "Peak memory: most bytes live during a step beyond those live before it "
        "(inputs not counted; CPU: torch.profiler allocation events replayed in time order).",
        "Command: `PYTHONPATH=. python scripts/bench_ops.py`.",
        "",
    ]
    if rows:
        lines += [
            f"## Ops ({dtype_name})",
            "",
            "| machine | op | variant | shape | time (ms) | peak (MB) | time vs eager | "
            "memory vs eager |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        eager = {r["case"]: r for r in rows if r["variant"] == "eager"}
        for r in rows:
            e = eager.get(r["case"])
            speed = f"{e['ms'] / r['ms']:.2f}x" if e else ""
            mem = f"{e['peak_mb'] / r['peak_mb']:.2f}x" if e and r["peak_mb"] > 0 else ""
            lines.append(
                f"| {machine} | {r['case']} | {r['variant']} | {r['shape']} | {r['ms']:.1f} | "
                f"{r['peak_mb']:.1f} | {speed} | {mem} |"
            )
        lines += [
            "",
            "`vs eager` columns: eager / variant (above 1 = faster or smaller). Times are medians "
            "of a few steps; on a CPU shared with other jobs they move by tens of percent between "
            "runs, while the peak-memory figures are exact and repeatable.",
            "",
        ]
    if figure:
        s = figure["size"]
        lines += [
            "## Key figure: linear cross-entropy memory",
            "",
            f"{s['tokens']} tokens x hidden {s['hidden']} x vocab {s['vocab']}, fp32, forward + "
            "backward (gradients of hidden and weight), default chunk size.",
            "",
            "| machine | variant | time (ms, best of 2) | peak, profiler (MB) | peak RSS rise (MB) "
            "| loss |",
            "|---|---|---:|---:|---:|---|",
        ]
        for name, r in figure["variants"].items():
            rss = f"{r['rss_rise_mb']:.0f}" if "rss_rise_mb" in r else "n/a"
            lines.append(
                f"| {machine} | {name} | {r['ms']:.0f} | {r['peak_mb']:.0f} | {rss} | "
                f"{r['loss']:.7f} |"
            )
        ratio_rss = figure.get("ratio_rss")
        lines += [
            "",
            f"Peak memory ratio (lm_head + F.cross_entropy / linear_cross_entropy): "
            f"**{figure['ratio_profiler']:.1f}x** by the profiler replay"
            + (f", **{ratio_rss:.1f}x** by RSS rise" if ratio_rss else "")
            + f"; |loss difference| = {figure['loss_diff']:.1e}.",
            "",
            "RSS rise: a fresh Python process per variant builds the inputs, runs a 256-token "
            "warm-up step, reads VmRSS, runs one step and reads ru_maxrss; the rise counts pages "
            "actually touched, including "
            "the allocator's own caching, so it is the figure a user sees in `top`; it varies "
            "between runs with what glibc malloc keeps mapped, the profiler figure does not.",
            "",
        ]
    path.write_text("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: fp32 cpu, bf16 cuda"
    )
    p.add_argument("--large", action="store_true", help="GPU sizes (default on cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 3 cpu, 20 cuda)")
    p.add_argument("--no-figure", dest="figure", action="store_false", help="skip the key figure")
    p.add_argument("--no-table", dest="table", action="store_false", help="only the key figure")
    p.add_argument("--out", type=Path, default=None, help="markdown path")
    p.add_argument("--rss-probe", choices=FIGURE_VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    large = args.large or device.type == "cuda"
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    machine = machine_name(device)
    backend = resolve_backend(None, device)
    print(f"machine {machine}, backend {backend}, dtype {dtype_name}")
    rows = run_table(args.cases, device, DTYPES[dtype_name], large, repeats) if args.table else []
    figure = run_figure(device) if args.figure else None
    out = args.out or RESULTS_DIR / f"ops_{machine}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(out, rows, figure, machine, device, dtype_name, backend)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
