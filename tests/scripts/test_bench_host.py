"""scripts/bench_host.py on a small subset, so that the host-time benchmark cannot rot: the
trivial launch, ``flash_attn_func`` forward and forward + backward, and a fused op, each with
its launch count and no host reads (no timing is asserted: the machine is shared).

The script runs in a subprocess: it sets TRITON_INTERPRET=0 before importing the kernels
(compiled for sm_90 with the bundled ptxas), which the interpreter-mode tests must not see.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_host.py"
ROWS = {  # row -> kernel launches of one call
    "flash_attn_func": 1,
    "flash_attn_func_fwd_bwd": 4,  # forward; delta, dK/dV and dQ
    "rotary": 2,
}


@pytest.fixture(scope="module")
def table() -> str:
    pytest.importorskip("triton")
    rows = ",".join(["trivial", *ROWS])
    command = [sys.executable, str(SCRIPT), "--rows", rows, "--calls", "5", "--out", "-"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_rows_launches_and_no_host_reads(table):
    from bench_host import ROWS as LABELS

    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    for row, launches in ROWS.items():
        cells = [c.strip() for c in lines[LABELS[row][0]].strip("|").split("|")]
        us, units, counted, reads = float(cells[1]), float(cells[2]), int(cells[3]), int(cells[4])
        assert us > 0 and units > 0, row
        assert counted == launches, f"{row}: {counted} launches, expected {launches}"
        assert reads == 0, f"{row}: {reads} host reads (device synchronisations)"
    unit = [c.strip() for c in lines[LABELS["trivial"][0]].strip("|").split("|")]
    assert int(unit[3]) == 1


def test_bad_row_is_named():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "no_such_row", "--out", "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--rows" in result.stderr and "no_such_row" in result.stderr
