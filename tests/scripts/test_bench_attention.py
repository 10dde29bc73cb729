"""scripts/bench_attention.py and benchmarks.common at tiny sizes."""

import math
import os
import runpy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.attention.case import Case, estimate_bytes
from benchmarks.attention.measure import run_case
from benchmarks.attention.sweep import GRIDS
from benchmarks.common import attention_flops, benchmark_time, peak_memory, tflops

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_attention.py"
main = runpy.run_path(str(SCRIPT))["main"]  # the command line, called in-process
TINY = [
    "--b",
    "1",
    "--h",
    "2",
    "--q_len",
    "37",
    "--kv_len",
    "53",
    "--d",
    "16",
    "--device",
    "cpu",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--block_m",
    "16",
    "--block_n",
    "16",
]


def _parse(line):
    """(ms, TFLOP/s, MiB) from a result line."""
    ms = float(line.split(" ms,")[0].rsplit(" ", 1)[1])
    rate = float(line.split(" TFLOP/s")[0].rsplit(" ", 1)[1])
    mib = float(line.split("peak ")[1].split(" MiB")[0])
    return ms, rate, mib


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("method", ["flash", "normal", "sdpa", "reference"])
def test_each_type_and_mode(method, mode, capsys):
    assert main(TINY + ["--type", method, "--mode", mode, "--causal"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(method) and f" {mode} " in line
    ms, rate, mib = _parse(line)
    assert ms > 0 and rate > 0 and mib >= 0


@pytest.mark.parametrize("method", ["normal", "sdpa", "reference"])
def test_random_mask(method, capsys):
    assert main(TINY + ["--type", method, "--mode", "fwd_bwd", "--mask", "random"]) == 0
    assert "mask=random" in capsys.readouterr().out


def test_flash_refuses_a_random_mask(capsys):
    assert main(TINY + ["--type", "flash", "--mask", "random"]) == 2
    assert "no arbitrary mask" in capsys.readouterr().err


def test_too_large_fails_with_the_memory_it_needs(capsys):
    argv = [
        "--type",
        "normal",
        "--q_len",
        "1048576",
        "--kv_len",
        "1048576",
        "--d",
        "64",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB" in err and "free on cpu" in err
    need = float(err.split("needs about ")[1].split(" GiB")[0])
    assert need > 1024 * 1024 * 1024**2 * 2 * 4 / 2**30  # at least the fp32 score matrices


def test_standard_attention_memory_grows_with_the_score_matrix():
    case = Case(
        method="normal",
        mode="fwd_bwd",
        batch=1,
        nheads=2,
        nheads_k=2,
        seqlen_q=256,
        seqlen_k=256,
        headdim=16,
        dtype="fp32",
        device="cpu",
    )
    normal = run_case(case, timing=False).peak_bytes
    tiled = run_case(replace(case, method="reference"), timing=False).peak_bytes
    scores = 2 * 256 * 256 * 4
    assert normal >= 2 * scores  # scores and probabilities are saved for the backward
    assert tiled < scores  # the tiled algorithm never holds a (256, 256) matrix per head
    assert estimate_bytes(case) >= normal


def test_profile_writes_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    argv = TINY + ["--type", "sdpa", "--mode", "fwd", "--profile", "--trace", str(trace)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert trace.exists() and trace.stat().st_size > 0
    assert "Self CPU" in out and "aten::" in out


def test_sweep_writes_table_and_figures(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    cpu = GRIDS["cpu"]
    tiny = {**cpu, "headdims": [16], "hidden": 32, "tokens": 128, "seqlens": [32, 64]}
    tiny.update(modes=["fwd", "fwd_bwd"], methods=["flash", "normal", "reference"], repeats=1)
    tiny.update(warmup=0, reference_blocks=16, max_seqlen={"reference": 32})
    tiny["memory"] = {**cpu["memory"], "nheads": 2, "headdim": 16, "seqlens": [64, 128]}
    monkeypatch.setitem(GRIDS, "cpu", tiny)
    argv = [
        "--sweep",
        "--grid",
        "cpu",
        "--device",
        "cpu",
        "--out_dir",
        str(tmp_path),
        "--machine",
        "test",
    ]
    assert main(argv) == 0
    md = (tmp_path / "attention_test.md").read_text()
    assert "## headdim 16, causal=True, fwd_bwd" in md and "## Memory" in md
    assert "| 128 |" in md and "x |" in md  # a saving factor at seqlen 128
    for name in ["d16_full", "d16_causal", "memory"]:
        assert (tmp_path / f"attention_test_{name}.png").stat().st_size > 1000
    assert "`reference` only up to seqlen 32" in md
    # The raw JSON redraws the same table.
    redrawn = tmp_path / "redrawn"
    argv = ["--from_json", str(tmp_path / "attention_test.json"), "--out_dir", str(redrawn)]
    assert main(argv) == 0
    assert (redrawn / "attention_test.md").read_text() == md
    assert (redrawn / "attention_test_memory.png").exists()


def test_command_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--type", "normal", "--mode", "fwd_bwd"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TFLOP/s" in proc.stdout and "MiB" in proc.stdout


# ----------------------------------------------------------------------------- helpers


def test_attention_flops_counts_visible_pairs():
    assert attention_flops(2, 3, 5, 7, 8) == 4 * 8 * 2 * 3 * 5 * 7
    # 4x4 causal: 1 + 2 + 3 + 4 pairs; bottom-right aligned for 2 queries / 4 keys: 3 + 4.
    assert attention_flops(1, 1, 4, 4, 1, causal=True) == 4 * 10
    assert attention_flops(1, 1, 2, 4, 1, causal=True) == 4 * 7
    assert attention_flops(1, 1, 4, 2, 1, causal=True) == 4 * (0 + 0 + 1 + 2)
    mask = torch.rand(2, 3, 5, 7) < 0.5
    assert attention_flops(2, 3, 5, 7, 8, mask=mask) == 4 * 8 * mask.sum().item()
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)
    assert attention_flops(2, 3, 5, 7, 8, mask=causal) == attention_flops(2, 3, 5, 7, 8, True)
    assert attention_flops(1, 1, 4, 4, 1, mode="bwd") == 2.5 * attention_flops(1, 1, 4, 4, 1)
    assert attention_flops(1, 1, 4, 4, 1, mode="fwd_bwd") == 3.5 * 64
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 4, 4, 1, mode="both")
    assert math.isclose(tflops(2e12, 0.5), 4.0)


def test_peak_memory_on_cpu_counts_live_bytes_beyond_the_start():
    existing = torch.ones(1 << 20)  # 4 MiB live before: not counted, even when freed inside
    holder = [existing]
    del existing

    def fn():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(2 << 20)  # + 8 MiB: 12 MiB live at the peak
        del a, b
        holder.clear()  # frees the 4 MiB that existed before
        c = torch.empty(1 << 20)  # 4 MiB, below the earlier peak
        return c

    peak = peak_memory(fn, device="cpu")
    assert 12 << 20 <= peak < (12 << 20) + (64 << 10)


def test_benchmark_time():
    calls = []
    t = benchmark_time(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and len(t.times_s) == 5 and t.min_s <= t.median_s
    with pytest.raises(ValueError, match="repeats"):
        benchmark_time(lambda: None, repeats=0, device="cpu")


def test_bad_sizes_name_the_argument(capsys):
    assert main(["--b", "0", "--q_len", "8", "--kv_len", "8", "--d", "8"]) == 2
    assert "b must be >= 1" in capsys.readouterr().err
    assert main(["--h", "3", "--h_k", "2", "--q_len", "8", "--kv_len", "8"]) == 2
    assert "multiple of h_k" in capsys.readouterr().err
