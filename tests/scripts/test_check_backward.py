"""scripts/check_backward.py: in-process at small sizes, and once through the command line."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_backward.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_backward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_backward = _load()
SMALL = [
    "--batch",
    "1",
    "--heads",
    "2",
    "--seqlen-q",
    "19",
    "--seqlen-k",
    "13",
    "--headdim",
    "8",
    "--block-m",
    "8",
    "--block-n",
    "5",
]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--causal"],
        ["--mask", "random", "--heads-k", "1"],
        ["--causal", "--mask", "random"],
        ["--dtype", "fp32", "--heads-k", "1"],
        ["--dtype", "fp16", "--causal"],
    ],
    ids=" ".join,
)
def test_passes_on_correct_implementations(extra, capsys):
    assert check_backward.main(SMALL + extra) == 0
    out = capsys.readouterr().out
    assert "(a) tiled forward, jacrev" in out and "(b) tiled autograd.Function" in out
    assert "FAIL" not in out and out.rstrip().endswith("PASS")
    assert "(c)" in out  # tests run with TRITON_INTERPRET=1: the kernels are checked too


def test_fails_when_the_backward_is_wrong(monkeypatch, capsys):
    real = check_backward.attention_tiled

    def wrong_backward(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        # Same forward, gradients scaled by 1.01.
        return out.detach() + 1.01 * (out - out.detach())

    monkeypatch.setattr(check_backward, "attention_tiled", wrong_backward)
    assert check_backward.main(SMALL) == 1
    out = capsys.readouterr().out
    assert "FAIL  (b)" in out and "PASS  (a)" in out


def test_command_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, "--causal", "--dtype", "fp32"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("PASS")
    if not torch.cuda.is_available():
        assert "Triton cannot run here" in proc.stdout
