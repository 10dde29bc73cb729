"""Training throughput: the Lightning loop against a bare PyTorch loop, and the quickstart.

    python scripts/bench_training.py                  # both parts, markdown to stdout
    python scripts/bench_training.py --out benchmarks/results/training_cpu-2core.md
    python scripts/bench_training.py --skip-quickstart --steps 10 --repeats 2

Loop overhead: the quickstart model and data, trained for ``--steps`` optimizer steps by

- bare: ``loss.backward(); clip_grad_norm_; optimizer.step(); scheduler.step()`` over the same
  data loader, nothing else;
- lightning: ``Trainer.fit`` with the quickstart's callbacks and loggers (progress bar,
  throughput/MFU, loss curve, CSV + TensorBoard, periodic last.ckpt), validation off.

Both start from the same weights; the two alternate ``--repeats`` times so that load from
other processes hits both alike, and the median step time of each is reported (first
``--warmup`` steps of each repeat excluded).

Quickstart: ``python train.py`` as a child process with a fresh cache folder (tokenizer
training and tokenisation included) and again with the warm cache; wall time, tokens/s and
the losses it prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkout_path  # noqa: F401 (makes training/ importable)
import torch

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose(config_name="config", overrides=overrides)


def _build(cfg):
    import hydra

    from training.train import build_module

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.build()
    return datamodule, build_module(cfg, datamodule.vocab_size)


def bare_steps(cfg, state: dict, steps: int) -> list[float]:
    """Seconds per optimizer step of a plain loop (one entry per step)."""
    datamodule, module = _build(cfg)
    module.load_state_dict(state)
    datamodule.setup("fit")
    opt, sched = module.optimizer_and_scheduler(cfg.trainer.max_steps)
    module.train()
    times, last = [], time.perf_counter()
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == steps:
            break
        loss = module.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the Lightning loop reads the loss too (progress bar, NaN check)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def lightning_steps(cfg, state: dict, steps: int, run_dir: Path) -> list[float]:
    """Seconds per optimizer step of Trainer.fit with the quickstart's callbacks and loggers."""
    import hydra
    import lightning as L

    from training.checkpointing import VerifiedCheckpointIO

    class StepClock(L.Callback):
        def __init__(self):
            self.stamps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.stamps.append(time.perf_counter())

    datamodule, module = _build(cfg)
    module.load_state_dict(state)
    clock = StepClock()
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c] + [clock]
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values() if c]
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=[VerifiedCheckpointIO()],
        max_steps=steps,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def loop_overhead(steps: int, warmup: int, repeats: int, run_dir: Path) -> dict:
    import lightning as L

    cfg = _compose([f"paths.output_dir={run_dir}", "trainer.accelerator=cpu"])
    L.seed_everything(0)
    _, module = _build(cfg)
    state = module.state_dict()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bare, light = [], []
    for _ in range(repeats):
        bare += bare_steps(cfg, state, warmup + steps)[warmup:]
        light += lightning_steps(cfg, state, warmup + steps, run_dir)[warmup:]
    b, li = statistics.median(bare), statistics.median(light)
    return {
        "tokens_per_step": tokens_per_step,
        "bare_s": b,
        "lightning_s": li,
        "bare_tok_s": tokens_per_step / b,
        "lightning_tok_s": tokens_per_step / li,
        "overhead": li / b - 1.0,
        "n": len(bare),
        "params": module.model.num_parameters(),
    }


def thread_counts(steps: int, run_dir: Path) -> list[tuple[int, float]]:
    """(threads, median s/step) of the bare loop with 1 thread and with one per core."""
    cfg = _compose([f"paths.output_dir={run_dir}", "trainer.accelerator=cpu"])
    _, module = _build(cfg)
    state = module.state_dict()
    before = torch.get_num_threads()
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        rows.append((threads, statistics.median(bare_steps(cfg, state, steps + 1)[1:])))
    torch.set_num_threads(before)
    return rows


def quickstart(cache_dir: Path, run_dir: Path) -> dict:
    env = {**os.environ, "FLASH_ATTN_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    out = proc.stdout

    def grab(pattern):
        match = re.search(pattern, out)
        return match.group(1) if match else None

    return {
        "wall_s": wall,
        "tokens_per_s": grab(r"([\d,]+) tokens/s"),
        "val_loss": grab(r"val loss\s+([\d.]+)"),
        "unigram_nats": grab(r"val loss.*unigram entropy ([\d.]+)"),
        "val_bpb": grab(r"val bits/byte\s+([\d.]+)"),
        "unigram_bpb": grab(r"val bits/byte.*unigram entropy ([\d.]+)"),
        "train_loss": grab(r"train loss\s+([\d.]+)"),
        "tail": out[out.rfind("\nrun folder") :].strip(),
    }


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--threads", default="auto", help="CPU threads of the loop comparison (as cpu_threads)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from training.train import cpu_threads

    threads = cpu_threads(args.threads, "cpu", 1)
    if threads is not None:
        torch.set_num_threads(threads)

    lines = [
        "# Training throughput",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"torch {torch.__version__}. Load average at start (1/5/15 min): {load_average()}; "
        "the machine was shared with other jobs while this ran. Loop comparison on "
        f"{torch.get_num_threads()} thread(s).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_quickstart:
            cold = quickstart(tmp / "cache", tmp / "qs_cold")
            warm = quickstart(tmp / "cache", tmp / "qs_warm")
            lines += [
                "## `python train.py` (quickstart)",
                "",
                "| cache | wall time (s) | training tokens/s | train loss | val loss "
                "(nats/token) | unigram entropy | val bits/byte | unigram bits/byte |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, r in (("cold (fresh machine)", cold), ("warm", warm)):
                lines.append(
                    f"| {name} | {r['wall_s']:.0f} | {r['tokens_per_s']} | {r['train_loss']} | "
                    f"{r['val_loss']} | {r['unigram_nats']} | {r['val_bpb']} | "
                    f"{r['unigram_bpb']} |"
                )
            lines += ["", "End of the output (cold run):", "", "```", cold["tail"], "```", ""]
        if not args.skip_overhead:
            r = loop_overhead(args.steps, args.warmup, args.repeats, tmp / "overhead")
            lines += [
                "## Lightning loop against a bare loop (quickstart model, "
                f"{r['params'] / 1e6:.2f}M parameters, {r['tokens_per_step']} tokens per step)",
                "",
                "| loop | median s/step | tokens/s |",
                "|---|---|---|",
                f"| bare PyTorch | {r['bare_s']:.3f} | {r['bare_tok_s']:,.0f} |",
                f"| Lightning (callbacks, loggers, checkpoints) | {r['lightning_s']:.3f} | "
                f"{r['lightning_tok_s']:,.0f} |",
                "",
                f"Overhead of the Lightning loop: {r['overhead']:+.1%} "
                f"({r['n']} steps of each, alternating in {args.repeats} rounds).",
                "",
            ]
        if not args.skip_overhead:
            rows = thread_counts(5, tmp / "threads")
            lines += [
                "## Threads on a shared machine (bare loop, median of 5 steps)",
                "",
                "| torch threads | s/step |",
                "|---|---|",
                *(f"| {t} | {sec:.3f} |" for t, sec in rows),
                "",
                "With other jobs on the machine, one thread per core makes every parallel op "
                "wait for the busy core: this is why `cpu_threads=auto` (the default) uses "
                "only the idle cores.",
                "",
            ]
    lines.append(f"Load average at the end: {load_average()}.")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
