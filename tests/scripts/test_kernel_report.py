"""scripts/kernel_report.py: the SASS analysis on a hand-written listing, and the script on
small subsets: the attention forward at two tiles and the LayerNorm forward compiled for sm_90,
and the forward's 128x128 tile, pruned for and compiled for sm_80.

The script runs in a subprocess: it sets TRITON_INTERPRET=0 before importing the kernels,
which the interpreter-mode tests of this session must not see.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_report.py"
# At head dim 128 the pruning for sm_90 keeps the 128x128 tile, with a causal mask or without.
TILES = {"bf16 d128 full": "128x128 w8 s2", "bf16 d128 causal": "128x128 w8 s2"}
SUBSET = [
    "--arch",
    "90",
    "--dtype",
    "bf16",
    "--head-dim",
    "128",
    "--kernel",
    "_attn_fwd_kernel",
    "--kernel",
    "_layer_norm_fwd_kernel",
    *(f"--config={tile}" for tile in TILES.values()),
]
# sm_80 keeps 128x128 (both stage counts) at head dim 64 without a mask only.
SUBSET_SM80 = [
    "--arch",
    "80",
    "--dtype",
    "bf16",
    "--head-dim",
    "64",
    "--config",
    "128x128 w8",
    "--kernel",
    "_attn_fwd_kernel",
]

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   IMAD R2, R3, R4, R5 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   STL.64 [R1+0x8], R6 ;
        /*0050*/                   LDL R7, [R1+0x4] ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
        /*0070*/                   ISETP.GE.AND P1, PT, R4, R5, PT ;
        /*0080*/              @!P1 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
.L_x_2:
        /*00a0*/                   BRA `(.L_x_2);
"""


def test_sass_analysis_finds_the_innermost_loop():
    pytest.importorskip("triton")
    from benchmarks import kernel_report as kr

    instructions = kr.parse_sass(SASS)
    assert [op for _, op, _ in instructions][:3] == ["MOV", "LDG.E", "IMAD"]
    assert instructions[6] == (0x60, "BRA", str(0x20))  # branch target resolved to its address
    # The inner loop (0x20..0x60), not the outer one around it nor the trap at the end.
    assert kr.main_loop(instructions) == kr.Loop(instructions=5, mma=1, integer=1, spill=2)
    assert kr.main_loop(kr.parse_sass("        /*0000*/  EXIT ;")) is None
    assert kr._spill_bytes("STL.64") == 8 and kr._spill_bytes("LDL.LU") == 4


def test_pipelined_loop_counts_before_a_longer_one_without_async_copies():
    """The forward's guarded rerun (loads, then stores to shared memory) has as many MMAs as
    the pipelined loops and more instructions, but runs only for a spoiled block."""
    pytest.importorskip("triton")
    from benchmarks import kernel_report as kr

    def loop(start, body):
        lines = [f"        /*{start + 16 * i:04x}*/  {op} ;" for i, op in enumerate(body)]
        label = f".L_x_{start}:"
        branch = f"        /*{start + 16 * len(body):04x}*/  @P0 BRA `({label[:-1]}) ;"
        return "\n".join([label, *lines, branch])

    mma = "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"
    pipelined = loop(0x100, ["LDGSTS.E [R2], desc[UR4][R4.64]", mma, "IMAD R2, R3, R4, R5"])
    rerun = loop(
        0x400,
        [
            "LDG.E R4, desc[UR4][R2.64]",
            "STS [R2], R4",
            mma,
            "IMAD R2, R3, R4, R5",
            "IMAD R2, R3, R4, R5",
        ],
    )
    found = kr.main_loop(kr.parse_sass(pipelined + "\n" + rerun))
    assert found == kr.Loop(instructions=4, mma=1, integer=1, spill=0)
    # Without any pipelined loop, the longest one with the most MMAs, as before.
    assert kr.main_loop(kr.parse_sass(rerun)).instructions == 6


def test_loop_counts_hopper_integer_work_wgmma_groups_atomics_and_the_unmasked_copy():
    pytest.importorskip("triton")
    from benchmarks import kernel_report as kr

    def loop(start, body):
        lines = [f"        /*{start + 16 * i:04x}*/  {op} ;" for i, op in enumerate(body)]
        label = f".L_x_{start}:"
        branch = f"        /*{start + 16 * len(body):04x}*/  @P0 BRA `({label[:-1]}) ;"
        return "\n".join([label, *lines, branch])

    arrive, mma = "WARPGROUP.ARRIVE", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"
    copy, add = "LDGSTS.E [R2], desc[UR4][R4.64]", "REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU [R2], R4"
    whole = [copy, arrive, mma, arrive, mma, "VIADD R2, R3, 0x10", add]
    edge = whole + ["SGXT R5, R5, 0x1", "ISETP.GE.AND P1, PT, R4, R5, PT", "FSEL R6, R6, R7, P1"]
    sass = kr.parse_sass(loop(0x100, whole) + "\n" + loop(0x400, edge))
    main, unmasked = kr.main_loop(sass), kr.unmasked_loop(sass)
    assert main == kr.Loop(instructions=11, mma=2, integer=3, spill=0, groups=2, atomics=1)
    assert unmasked == kr.Loop(instructions=8, mma=2, integer=1, spill=0, groups=2, atomics=1)
    assert kr.unmasked_loop(kr.parse_sass(loop(0x100, whole))) is None


def start_report(args, output) -> subprocess.Popen:
    """The script on ``args``, writing ``output``, started in a child process."""
    pytest.importorskip("triton")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )


def report_tables(proc: subprocess.Popen, output):
    """Tables of the report a :func:`start_report` child writes, by kernel: a list of
    {column: cell} rows."""
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0 and "not found" in stderr.lower():
        pytest.skip("Triton's ptxas, cuobjdump or nvdisasm is not available")
    if proc.returncode != 0:  # not an AssertionError: the xfail below must not absorb it
        pytest.fail(stderr[-3000:])
    tables, kernel, columns = {}, None, None
    for line in output.read_text().splitlines():
        if line.startswith("## "):
            kernel, columns = line.split()[1], None
            tables[kernel] = []
        elif line.startswith("| ") and kernel:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if columns is None:
                columns = cells
            else:
                tables[kernel].append(dict(zip(columns, cells)))
    return tables


BACKWARD = [
    *("--arch", "90", "--dtype", "bf16", "--head-dim", "64", "--feature", "full"),
    *("--kernel", "_attn_bwd_dkdv_kernel", "--kernel", "_attn_bwd_dq_kernel"),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The reports of SUBSET, SUBSET_SM80 and BACKWARD, by name: the three children run at
    once (each is mostly a single-threaded start-up and compile)."""
    folder = tmp_path_factory.mktemp("report")
    runs = {"sm90": SUBSET, "sm80": SUBSET_SM80, "backward": BACKWARD}
    started = {name: start_report(args, folder / f"{name}.md") for name, args in runs.items()}
    try:
        return {name: report_tables(proc, folder / f"{name}.md") for name, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def report(reports):
    return reports["sm90"]


@pytest.fixture(scope="module")
def report_sm80(reports):
    return reports["sm80"]


def test_report_has_real_figures(report):
    forward, norm = report["_attn_fwd_kernel"], report["_layer_norm_fwd_kernel"]
    assert {r["variant"]: r["config"] for r in forward} == TILES
    assert [r["variant"] for r in forward] == list(TILES)
    assert len(norm) == 2  # LayerNorm and RMSNorm, at their launchers' fixed block
    for r in forward + norm:
        assert 0 < int(r["regs"]) <= 255
        assert all(int(b) >= 0 for b in r["spill B st/ld"].split("/"))
        assert float(r["smem KB"]) >= 0
    for r in forward:
        assert float(r["smem KB"]) > 0
        assert int(r["MMA HGMMA/HMMA"].split("/")[0]) > 0 and r["wgmma"] == "all"
        assert int(r["loop MMA"]) > 0
        assert int(r["loop instr"]) > int(r["loop MMA"]) + int(r["loop int"])
    # The causal mask costs integer work in the loop over the blocks on the diagonal.
    assert int(forward[1]["loop int"]) > int(forward[0]["loop int"])


def test_kept_configs_fit(report):
    """Every config the kernels' pruning keeps compiles without spills, within shared memory."""
    misfits = [
        f"{kernel} {r['variant']} {r['config']}: {r['fits']}"
        for kernel, rows in report.items()
        for r in rows
        if r["fits"] != "yes"
    ]
    assert not misfits, misfits


def test_sm80_prunes_and_compiles_for_sm80(report_sm80):
    """The 128x128 forward fits on sm_80 without a mask (with mma.sync: no wgmma there); with
    one the pruning for sm_80 drops it."""
    forward = report_sm80["_attn_fwd_kernel"]
    assert [(r["variant"], r["config"]) for r in forward] == [
        ("bf16 d64 full", "128x128 w8 s2"),
        ("bf16 d64 full", "128x128 w8 s3"),
    ]
    for r in forward:
        assert r["fits"] == "yes" and r["wgmma"] == "none"
        assert int(r["MMA HGMMA/HMMA"].split("/")[1]) > 0


@pytest.fixture(scope="module")
def report_backward(reports):
    return reports["backward"]


def test_the_backward_takes_five_products_per_tile_pair_or_seven_deterministic(report_backward):
    """deterministic=False: one loop of five wgmma groups that adds dQ atomically; True: four
    in the dK/dV loop and three in the dQ loop, no atomics. The configs are the table's."""
    dkdv = {r["variant"]: r for r in report_backward["_attn_bwd_dkdv_kernel"]}
    (dq,) = report_backward["_attn_bwd_dq_kernel"]
    atomic, ordered = dkdv["bf16 d64 full"], dkdv["bf16 d64 full deterministic"]
    assert (atomic["loop groups"], ordered["loop groups"], dq["loop groups"]) == ("5", "4", "3")
    assert int(atomic["loop atomics"]) > 0 and ordered["loop atomics"] == dq["loop atomics"] == "0"
    assert all(r["fits"] == "yes" and r["wgmma"] == "all" for r in (atomic, ordered, dq))
    assert atomic["config"] == "64x128 w8 s2" and dq["config"] == "128x64 w8 s2"
