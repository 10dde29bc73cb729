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
    "autograd_floor": 0,  # a reference row: PyTorch alone
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
    # The table's rows, in the order asked for, after its header and separator.
    body = [line for line in table.splitlines() if line.startswith("| ")][1:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert len(cells) == 1 + len(ROWS), table
    assert int(cells[0][3]) == 1  # the trivial launch
    for (row, launches), (_, us, units, counted, reads) in zip(ROWS.items(), cells[1:]):
        assert float(us) > 0 and float(units) > 0, row
        assert int(counted) == launches, f"{row}: {counted} launches, expected {launches}"
        assert int(reads) == 0, f"{row}: {reads} host reads (device synchronisations)"


def test_bad_row_is_named():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "no_such_row", "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "--rows" in result.stderr and "no_such_row" in result.stderr
