"""The attention-features benchmark runs end to end at a tiny size and writes its table."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_attention_features", ROOT / "scripts" / "bench_attention_features.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_section(tmp_path):
    out = tmp_path / "features.md"
    code = _load().main(
        [
            "--device",
            "cpu",
            "--heads",
            "2",
            "--headdim",
            "16",
            "--seqlen",
            "300",
            "--window",
            "32",
            "--batch",
            "3",
            "--max-len",
            "80",
            "--cache-len",
            "100",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = out.read_text()
    for section in ("Sliding window 32 vs full causal", "Varlen vs padded", "Single-token decode"):
        assert section in text
    assert "| fwd_bwd |" in text and "| flash_attn_with_kvcache |" in text
