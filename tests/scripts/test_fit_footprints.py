"""scripts/fit_footprints.py on a hand-written unpruned report: the terms it finds keep no
config that spills, and the longest step that compiles cleanly in each group."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

# dQ at head dim 128, 4 warps on 64 rows: without a mask the 16- and 32-key steps compile
# cleanly and 64 spills; with one, only 16 does.
REPORT = """# Triton kernels compiled for sm_90

## _attn_bwd_dq_kernel (3 of 6 fit)

| variant | config | regs | spill B st/ld | smem KB | fits |
|---|---|---|---|---|---|
| bf16 d128 full | 64x16 w4 s2 | 121 | 0/0 | 48.0 | yes |
| bf16 d128 full | 64x32 w4 s2 | 126 | 0/0 | 64.0 | yes |
| bf16 d128 full | 64x64 w4 s2 | 255 | 24/24 | 96.0 | no: spill |
| bf16 d128 causal | 64x16 w4 s2 | 146 | 0/0 | 48.0 | yes |
| bf16 d128 causal | 64x32 w4 s2 | 255 | 8/8 | 64.0 | no: spill |
| bf16 d128 causal | 64x64 w4 s2 | 255 | 96/96 | 96.0 | no: spill |
"""


def test_fit_keeps_the_longest_clean_steps(tmp_path):
    pytest.importorskip("triton")
    import dataclasses

    import fit_footprints as ff

    path = tmp_path / "report.md"
    path.write_text(REPORT)
    rows = ff.read_report(path, "_attn_bwd_dq_kernel")
    assert [(c.kwargs["BLOCK_N"], d, masked, spills) for c, d, masked, spills in rows][:3] == [
        (16, 128, False, False),
        (32, 128, False, False),
        (64, 128, False, True),
    ]
    value, terms, low, high = ff.fit(rows, "dq", 90)
    assert value == 2 and low <= high  # both groups keep their longest clean step
    base = ff.FOOTPRINTS["dq"]
    footprint = dataclasses.replace(base, registers={**base.registers, 90: (low, *terms)})
    kept = [
        (c.kwargs["BLOCK_N"], masked)
        for c, d, masked, _ in rows
        if footprint.fits(c, d, masked, 2, 90, 227 * 1024)
    ]
    assert sorted(kept) == [(16, False), (16, True), (32, False)]
    # One register more than the range allows keeps a config that spills.
    wider = dataclasses.replace(base, registers={90: (high + 1, *terms)})
    assert ff.score(wider, rows, 90) is None


def test_missing_or_empty_report_is_refused(tmp_path, capsys):
    pytest.importorskip("triton")
    import fit_footprints as ff

    with pytest.raises(SystemExit) as missing:
        ff.main([str(tmp_path / "absent.md"), "dq"])
    assert missing.value.code == 2 and "report" in capsys.readouterr().err
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing\n")
    with pytest.raises(SystemExit) as no_rows:
        ff.main([str(empty), "dq"])
    assert no_rows.value.code == 2 and "_attn_bwd_dq_kernel" in capsys.readouterr().err
