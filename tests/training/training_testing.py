"""Helpers of the training tests: local text in every supported format, composed configs,
``train.py`` as a child process."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

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
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """{optimizer step: train loss} from the run's losses.csv."""
    with open(run_dir / "losses.csv") as f:
        return {
            int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"
        }


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll predicate() until it is true (True), proc ends or timeout passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def slow_run_overrides(corpus: Path, cache_dir: Path, run_dir: Path, steps: int) -> list[str]:
    """A run slow enough to be stopped mid-training (4 layers, 8 x 64 tokens per step) in
    run_dir, checkpointing every 4 steps, flushing metrics every step."""
    return [
        *tiny_overrides(corpus, cache_dir, run_dir),
        "logger.csv.flush_logs_every_n_steps=1",
        f"trainer.max_steps={steps}",
        f"scheduler.total_steps={steps}",
        "trainer.val_check_interval=1000",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "callbacks.best_checkpoint=null",
        "sample.max_new_tokens=0",
        "model.config.n_layer=4",
        "data.batch_size=8",
        "data.seq_len=64",
    ]


def slow_run_args(corpus: Path, cache_dir: Path, run_dir: Path, steps: int) -> list[str]:
    """:func:`slow_run_overrides` as train.py arguments (the run folder as hydra.run.dir)."""
    overrides = slow_run_overrides(corpus, cache_dir, run_dir, steps)
    return [o for o in overrides if not o.startswith("paths.output_dir=")] + [
        f"hydra.run.dir={run_dir}"
    ]


def two_cpu_process_args(
    corpus: Path, cache_dir: Path, run_dir: Path, steps: int, strategy: str, total_steps: int = 6
) -> list[str]:
    """train.py arguments of a tiny run in run_dir on two CPU processes (gloo): steps of a
    total_steps schedule, strategy a trainer.strategy value (e.g. ddp, or a {_target_: ...}
    mapping), no validation or sample."""
    trainer = "fsdp" if "fsdp" in strategy else "ddp"
    return [
        *tiny_overrides(corpus, cache_dir, run_dir)[:-2],
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32",
        f"trainer.strategy={strategy}",
        f"trainer.max_steps={steps}",
        f"scheduler.total_steps={total_steps}",
        "trainer.val_check_interval=100",
        "sample.max_new_tokens=0",
    ]


def step_checkpoint_overrides(step: int) -> list[str]:
    """A callback keeping the checkpoint of optimizer step ``step`` as
    ``checkpoints/at-<step>.ckpt`` beside last.ckpt (a run to resume from, and the
    uninterrupted run to compare with, in one)."""
    key = "+callbacks.at_step"
    return [
        f"{key}._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"{key}.dirpath=${{paths.output_dir}}/checkpoints",
        f"{key}.filename='at-{{step}}'",
        f"{key}.every_n_train_steps={step}",
        f"{key}.save_top_k=-1",
        f"{key}.auto_insert_metric_name=false",
        f"{key}.save_on_train_epoch_end=false",
    ]


def add_callbacks(monkeypatch, *callbacks) -> None:
    """Make train() hand the Trainer these callback instances besides the config's."""
    import hydra

    real_instantiate = hydra.utils.instantiate

    def instantiate(config, *args, **kwargs):
        if kwargs.get("callbacks"):
            kwargs["callbacks"] = [*kwargs["callbacks"], *callbacks]
        return real_instantiate(config, *args, **kwargs)

    monkeypatch.setattr(hydra.utils, "instantiate", instantiate)


def metric_steps(run_dir: Path, key: str) -> list[int]:
    """The steps of the run's csv/metrics.csv rows that hold key, in file order."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint file records."""
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
