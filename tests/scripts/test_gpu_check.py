"""scripts/gpu_check.sh --dry-run: every step of the GPU check, on CPU at tiny sizes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_runs_every_step(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},  # this interpreter, not .venv/bin/python
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = {p.stem for p in tmp_path.glob("*.log")}
    assert {"tests", "ops", "model"} <= logs
    assert any(name.startswith("attention") for name in logs)
    assert (tmp_path / "ops.md").exists() and (tmp_path / "model.md").exists()
