"""scripts/bench_model.py runs end to end on a tiny config and writes its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_model.py"


def test_bench_model_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "model.md"
    text = module.main(
        [
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--vocab-size",
            "100",
            "--batch",
            "1",
            "--seqlen",
            "16",
            "--repeats",
            "1",
            "--prompt-len",
            "4",
            "--new-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| transformers GPT2LMHeadModel (sdpa)",
        "| ours",
        "| ours + linear CE",
    ]
    assert rows[0].split(" | ")[2] == "1.00x"
    for row in rows:
        train, memory, decode = (float(row.split(" | ")[i]) for i in (1, 3, 5))
        assert train > 0 and memory >= 0 and decode > 0
