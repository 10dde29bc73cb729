"""Fit the register terms of an attention kernel's footprint to an unpruned kernel report.

``scripts/kernel_report.py --unpruned`` compiles every config of the autotune spaces and says
which spill. This searches a grid of :class:`~flash_attn.ops.attention.triton.tuning.Footprint`
register terms (scores, masked, loaded, guard) and budgets for those under which no config that
the footprint keeps spills, and the longest kept step of every owned block, warps, head dim and
masking is as long as possible (summed as a fraction of the longest step that compiles without
spilling). It prints the best terms and the range of budgets that reach their score; pick one
in the middle of that range for ``FOOTPRINTS`` in ``flash_attn/ops/attention/triton/tuning.py``.

    python scripts/kernel_report.py --kernel attn_fwd --dtype bf16 --unpruned --output fwd.md
    python scripts/fit_footprints.py fwd.md fwd
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
from pathlib import Path

import triton

from flash_attn.ops.attention.triton.tuning import FOOTPRINTS

KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
GRID = dict(
    scores=[0.5, 1, 2, 4, 6, 8, 10],
    masked=[0, 0.25, 0.5, 1, 2, 3, 4, 6],
    loaded=[0, 0.25, 0.5, 1, 2],
    guard=[0, 1, 2, 4, 6, 8],
)
_VARIANT = re.compile(r"(\w+) d(\d+) (\w+)")
_CONFIG = re.compile(r"(\d+)x(\d+) w(\d+) s(\d+)")


def read_report(path: Path, kernel: str) -> list[tuple[triton.Config, int, bool, bool]]:
    """(config, head dim, masked, spills) of every row of ``kernel``'s table in a report."""
    rows = []
    for section in path.read_text().split("\n## ")[1:]:
        if not section.startswith(kernel + " "):
            continue
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 4:
                continue
            variant, config = _VARIANT.match(cells[0]), _CONFIG.match(cells[1])
            if not (variant and config):
                continue
            bm, bn, warps, stages = map(int, config.groups())
            blocks = triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages
            )
            rows.append((blocks, int(variant[2]), variant[3] == "causal", cells[3] != "0/0"))
    return rows


def score(footprint, rows, arch: int) -> float | None:
    """Sum over groups (owned block, warps, head dim, masking) of the longest kept step over the
    longest step that does not spill; None when a kept config spills."""
    longest_fit, longest_kept = {}, {}
    for config, head_dim, masked, spills in rows:
        registers, budget = footprint.registers_per_thread(config, head_dim, masked, arch)
        group = (config.kwargs[footprint.owned], config.num_warps, head_dim, masked)
        step = footprint.step(config)
        if registers <= budget:
            if spills:
                return None
            longest_kept[group] = max(longest_kept.get(group, 0), step)
        if not spills:
            longest_fit[group] = max(longest_fit.get(group, 0), step)
    return sum(longest_kept.get(group, 0) / step for group, step in longest_fit.items())


def fit(rows, kernel: str, arch: int):
    """(score, terms, lowest budget, highest budget) of the best terms on the grid."""
    base = FOOTPRINTS[kernel]
    best = None
    for terms in itertools.product(*GRID.values()):
        budgets = []
        for budget in range(64, 256):
            registers = {**base.registers, arch // 10 * 10: (budget, *terms)}
            footprint = dataclasses.replace(base, registers=registers)
            value = score(footprint, rows, arch)
            if value is None:
                break
            budgets.append((value, budget))
        if not budgets:
            continue
        top = max(value for value, _ in budgets)
        reach = [budget for value, budget in budgets if value == top]
        if best is None or top > best[0]:
            best = (top, terms, reach[0], reach[-1])
    return best


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a kernel report made with --unpruned")
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--arch", type=int, default=90, help="the report's arch: 90 or 80")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"report: {args.report} is not a file (make one with kernel_report.py)")
    rows = read_report(args.report, KERNELS[args.kernel])
    if not rows:
        parser.error(f"report: no rows of {KERNELS[args.kernel]} in {args.report}")
    best = fit(rows, args.kernel, args.arch)
    if best is None:
        print("no terms on the grid keep only configs that compile without spilling")
        return 1
    value, terms, low, high = best
    names = ", ".join(f"{name} {term}" for name, term in zip(GRID, terms))
    print(f"{args.kernel}: {names}; budget {low} to {high} (score {value:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
