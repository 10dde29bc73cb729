"""A sweep's figures: throughput bars per (headdim, causal), memory and saving per seqlen."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.attention.case import (
    MODES,
    memory_saving_rows,
    throughput_unit,
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen >= 1024 else str(seqlen)


def plot_throughput(results, out_dir: Path, machine: str) -> list[Path]:
    """One PNG per (headdim, causal): a panel per mode, bars per method per seqlen."""
    plt = _pyplot()
    scale, unit = throughput_unit(results)
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
            ax.set_xticks(range(len(seqlens)), [_seqlen_label(s) for s in seqlens])
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
    plt = _pyplot()
    rows = memory_saving_rows(memory_results)
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
        ax.set_xticks(seqlens, [_seqlen_label(s) for s in seqlens])
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
