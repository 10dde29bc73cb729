"""Helpers of the training tests: local text in every supported format, composed configs,
``train.py`` as a child process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "which",
    "or",
    "had",
    "are",
    "flash",
    "attention",
    "kernel",
    "block",
    "tile",
    "softmax",
    "query",
    "key",
    "value",
    "head",
    "model",
    "layer",
    "token",
    "train",
    "loss",
    "step",
    "batch",
    "data",
    "cache",
    "file",
    "window",
    "sample",
    "rank",
    "seed",
    "epoch",
    "shard",
    "memory",
    "gradient",
]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """n short pseudo-English documents (deterministic, some non-ASCII)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(40, 120))]
        docs.append(f"Document {i} – café: " + " ".join(words) + ".")
    return docs


def write_corpus(folder: Path, docs: list[str], fmt: str) -> list[Path]:
    """docs written as .txt files (one per document), .jsonl, .jsonl.zst or .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        paths = []
        for i, doc in enumerate(docs):
            path = folder / f"doc{i:03d}.txt"
            path.write_text(doc, encoding="utf-8")
            paths.append(path)
        return paths
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    if fmt == "jsonl":
        path = folder / "corpus.jsonl"
        path.write_text(lines, encoding="utf-8")
    elif fmt == "jsonl.zst":
        import zstandard

        path = folder / "corpus.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "corpus.parquet"
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    else:
        raise ValueError(fmt)
    return [path]


def tiny_overrides(corpus: Path, cache_dir: Path, output_dir: Path) -> list[str]:
    """Any experiment on the local corpus with a byte tokenizer, a tiny model, on the CPU."""
    return [
        "debug=tiny",
        "data=files",
        f"data.source.data_files={corpus}",
        "data.source.val_fraction=0.2",
        "data.tokenizer.kind=bytes",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={output_dir}",
        "logger=csv",
    ]


def compose_config(overrides: list[str]):
    """The real config composed with overrides (no Hydra run: paths.output_dir must be set)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=overrides)


def run_train_py(args: list[str], cache_dir: Path, **popen) -> subprocess.Popen:
    """python train.py args..., in the checkout root, as a child process."""
    env = {**os.environ, "FLASH_ATTN_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )  # fmt: skip
