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


# Each launch's kernel arguments on the stand-in driver, first through Triton's own path (the
# first call of a shape), then replayed by the launch plans: with the same input tensors, the
# same arguments in the same places (the outputs are fresh tensors of the same kind).
_REPLAY = """
import sys
sys.path.insert(0, "scripts")
import bench_host
import torch
import triton

bench_host.install_stand_in()
calls = []
bench_host._StandInUtils.launch = lambda self, *launch_args: calls[-1].append(launch_args)


def kind(arg):
    if type(arg) is torch.Tensor:
        return ("tensor", arg.dtype, tuple(arg.shape), arg.stride())
    return arg


for row in (
    "flash_attn_func_fwd_bwd",
    "kvcache_decode",
    "layer_norm",
    "rotary",
    "cross_entropy",
    "linear_cross_entropy",
    "fused_mlp",
):
    call = bench_host.ROWS[row][1]()
    for _ in range(2):
        calls.append([])
        call()
    first, replayed = ([launch[-1] for launch in launches] for launches in calls[-2:])
    assert len(first) >= len(replayed) > 0, (row, len(first), len(replayed))
    # A kernel that autotunes first launches each candidate config: its real launch comes last.
    first = first[len(first) - len(replayed) :]
    for a, b in zip(first, replayed):
        assert [kind(x) for x in a] == [kind(x) for x in b], row
    # The memory both calls pass (inputs and their views, placeholders) is in the same places:
    # no two swapped. (The lists keep every tensor alive, so no address is reused.)
    def addresses(c):
        return {x.data_ptr() for a in c for x in a if isinstance(x, torch.Tensor)}

    both = addresses(first) & addresses(replayed)
    assert both, row
    for a, b in zip(first, replayed):
        pairs = [(x, y) for x, y in zip(a, b) if isinstance(x, torch.Tensor)]
        shared = [(x, y) for x, y in pairs if x.data_ptr() in both or y.data_ptr() in both]
        assert all(x.data_ptr() == y.data_ptr() for x, y in shared), row
    # The launch hooks reach the driver's launch while someone added one (the plans skip them,
    # and the metadata built for them, while Triton's chain of hooks is empty).
    chain = triton.knobs.runtime.launch_enter_hook
    assert not any(arg is chain for launch in calls[-1] for arg in launch), row
    hook = lambda metadata: None  # noqa: E731
    chain.add(hook)
    calls.append([])
    call()
    chain.remove(hook)
    assert calls[-1] and all(any(arg is chain for arg in launch) for launch in calls[-1]), row
print("replayed")
"""


def test_replayed_launches_pass_what_the_first_launch_passed():
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-c", _REPLAY], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "replayed" in result.stdout, result.stderr[-3000:]
