"""Training runs on the CPU: quickstart, every experiment for two steps, resume, DDP (faults:
test_training_faults.py)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
from training_testing import (
    EXPERIMENTS,
    add_callbacks,
    checkpoint_step,
    compose_config,
    losses_by_step,
    run_train_py,
    step_checkpoint_overrides,
    tiny_overrides,
    two_cpu_process_args,
)

from training.lightning_module import GPTLightningModule, NonFiniteLossError
from training.train import train


def test_quickstart_runs_a_few_steps(tmp_path, cache_dir):
    cfg = compose_config(
        [
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            "data.source.max_bytes=150000",
            "data.tokenizer.vocab_size=300",
            "data.tokenizer.train_bytes=150000",
            "data.batch_size=4",
            "data.seq_len=32",
            "model.config.n_layer=1",
            "model.config.n_embd=32",
            "model.config.n_head=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1",
            "trainer.accelerator=cpu",
            "callbacks.progress_bar=null",
            "sample.max_new_tokens=40",
            "callbacks.throughput.window_size=2",
        ]
    )
    summary = train(cfg)
    assert summary["global_step"] == 4 and summary["tokens_seen"] == 4 * 4 * 32
    assert summary["tokens_per_s"] > 0  # from Lightning's ThroughputMonitor (window of 2)
    assert math.isfinite(summary["val_loss"]) and summary["val_bpb"] > 0
    assert summary["unigram_entropy_nats"] > 0
    assert summary["sample"].startswith("def __init__(self") and len(summary["sample"]) > 10
    for name in ("loss_curve.png", "losses.csv", "csv/metrics.csv", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["best_checkpoint"] and Path(summary["best_checkpoint"]).is_file()
    with open(tmp_path / "losses.csv") as f:
        val_points = [r for r in csv.DictReader(f) if r["split"] == "val"]
    # The curve's validation point is the validation that ran at that step.
    assert [int(r["step"]) for r in val_points] == [4]
    assert float(val_points[0]["loss"]) == pytest.approx(summary["val_loss"], rel=1e-6)
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/ppl",
        "train/device/items_per_sec",
        "train/tokens_seen",
        "val/loss",
        "val/ppl",
        "val/bpb",
        "data/unigram_entropy_nats",
    ):
        assert key in header, key


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if e != "finetune"])
def test_experiment_trains_two_steps(name, tmp_path, cache_dir, corpus):
    cfg = compose_config([f"experiment={name}", *tiny_overrides(corpus, cache_dir, tmp_path)])
    summary = train(cfg)
    assert summary["global_step"] == 2
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert cfg.model.preset in (None, name.replace("-rotary", "").replace("-8k", ""))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_accumulation_and_precision(precision, tmp_path, cache_dir, corpus):
    cfg = compose_config(
        [
            *tiny_overrides(corpus, cache_dir, tmp_path),
            f"trainer.precision={precision}",
            "global_batch_size=4",
            "trainer.max_steps=2",
            # autocast hands the fused MLP bf16 activations with fp32 weights, which it rejects
            *(["+model.config.fused_mlp=false"] if precision != "32" else []),
        ]
    )
    summary = train(cfg)
    # 2 optimizer steps of 2 micro-batches of 2 sequences of 32 tokens
    assert summary["global_step"] == 2 and summary["tokens_seen"] == 2 * 4 * 32
    assert math.isfinite(summary["val_loss"])
    assert summary["mfu"] is None  # no peak FLOP/s for a CPU


def test_finetune_starts_from_a_hugging_face_folder(tmp_path, cache_dir, corpus):
    pytest.importorskip("flash_attn.models.hf_checkpoint")
    from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel

    torch.manual_seed(0)
    pretrained = GPTLMHeadModel(
        GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    )
    pretrained.save_pretrained(tmp_path / "hf")
    cfg = compose_config(
        [
            "experiment=finetune",
            *tiny_overrides(corpus, cache_dir, tmp_path / "run"),
            f"model.pretrained={tmp_path / 'hf'}",
            "trainer.max_steps=1",
            "optimizer.lr=1e-9",
        ]
    )
    summary = train(cfg)
    assert summary["global_step"] == 1
    # a near-zero learning rate leaves the loaded weights: the run started from them
    state = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=False)
    wte = state["state_dict"]["model.transformer.embeddings.wte.weight"][:257]  # unpadded rows
    torch.testing.assert_close(
        wte, pretrained.transformer.embeddings.wte.weight[:257].detach(), atol=1e-6, rtol=0
    )


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_plain_keys(tmp_path, cache_dir, corpus):
    cfg = compose_config([*tiny_overrides(corpus, cache_dir, tmp_path), "model.compile=true"])
    summary = train(cfg)
    assert summary["global_step"] == 2 and math.isfinite(summary["val_loss"])
    state = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in state["state_dict"])


class NeedsMissingPackage:
    """A logger whose package is not installed (as TensorBoardLogger without tensorboard)."""

    def __init__(self):
        raise ModuleNotFoundError("No module named 'tensorboard'")


def test_logger_with_missing_package_is_skipped(tmp_path, cache_dir, corpus):
    cfg = compose_config(
        [
            *tiny_overrides(corpus, cache_dir, tmp_path),
            f"+logger.tb._target_={__name__}.NeedsMissingPackage",
        ]
    )
    assert train(cfg)["global_step"] == 2  # the CSV logger still writes
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    typo = compose_config(
        [
            *tiny_overrides(corpus, cache_dir, tmp_path / "typo"),
            "+logger.tb._target_=no_such_package.Logger",
        ]
    )
    with pytest.raises(Exception, match="no_such_package"):
        train(typo)


def _resume_overrides(corpus, cache_dir, run_dir, steps):
    return [
        *tiny_overrides(corpus, cache_dir, run_dir),
        f"trainer.max_steps={steps}",
        f"scheduler.total_steps={steps}",
        "scheduler.warmup_steps=2",
        "trainer.val_check_interval=3",
        "optimizer.lr=1e-2",
    ]


def test_resume_continues_with_the_samelosses_by_step(tmp_path, cache_dir, corpus):
    full = train(compose_config(_resume_overrides(corpus, cache_dir, tmp_path / "full", 8)))
    cfg = compose_config(_resume_overrides(corpus, cache_dir, tmp_path / "part", 8))
    cfg.trainer.max_steps = 5  # same schedule (total_steps=8), stopped early
    train(cfg)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert checkpoint_step(ckpt) == 5
    resumed = compose_config(
        [*_resume_overrides(corpus, cache_dir, tmp_path / "resumed", 8), f"ckpt_path={ckpt}"]
    )
    out = train(resumed)
    assert out["global_step"] == 8 and out["tokens_seen"] == full["tokens_seen"]
    # the throughput line: this process's steps, tokens and time, one span
    tokens = 3 * 2 * 32  # steps 5 to 8, 2 x 32 tokens each
    assert (out["first_step"], out["tokens_trained"]) == (5, tokens)
    assert out["tokens_per_s"] == pytest.approx(tokens / out["train_s"])
    summary_text = (tmp_path / "resumed" / "summary.txt").read_text()
    assert f"steps 5 to 8: {tokens} tokens in {out['train_s']:.0f} s of training" in summary_text
    want, got = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 9))  # the curve's points up to step 5 come along
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_dir, corpus, monkeypatch):
    real_loss = GPTLightningModule.loss

    def loss_nan_from_step_3(self, batch, reduction="mean"):
        value = real_loss(self, batch, reduction)
        return value * float("nan") if self.training and self.global_step >= 3 else value

    monkeypatch.setattr(GPTLightningModule, "loss", loss_nan_from_step_3)
    cfg = compose_config(
        [
            *tiny_overrides(corpus, cache_dir, tmp_path),
            "trainer.max_steps=6",
            "trainer.val_check_interval=100",
        ]
    )
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, cache_dir, corpus):
    """Two train.py runs of two CPU processes (DDP, gloo): 6 steps, validating at step 6,
    keeping the checkpoint of step 3 (checkpoints/at-3.ckpt) beside last.ckpt and sampling on
    rank 0 at the end; then a run resumed from that checkpoint to step 6. The folders of both
    runs and the first run's output."""
    root = tmp_path_factory.mktemp("ddp")
    full_dir, resumed_dir = root / "full", root / "resumed"
    args = [
        *(
            a
            for a in two_cpu_process_args(corpus, cache_dir, full_dir, 6, "ddp")
            if "sample" not in a
        ),
        "trainer.val_check_interval=6",
    ]
    proc = run_train_py([*args, *step_checkpoint_overrides(3)], cache_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    ckpt = full_dir / "checkpoints" / "at-3.ckpt"
    args = [
        *two_cpu_process_args(corpus, cache_dir, resumed_dir, 6, "ddp"),
        "trainer.val_check_interval=6",
        f"ckpt_path={ckpt}",
    ]
    resumed = run_train_py(args, cache_dir)
    resumed_out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, resumed_out[-4000:]
    return full_dir, resumed_dir, out


def test_ddp_resume_continues_each_rank_shard(ddp_runs):
    full_dir, resumed_dir, _ = ddp_runs
    want, got = losses_by_step(full_dir), losses_by_step(resumed_dir)
    assert sorted(want) == list(range(1, 7))
    assert sorted(got) == list(range(1, 7))  # the curve's points up to step 3 come along
    for step in got:  # rank 0's loss; its batches depend on both ranks' shard positions
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_ddp_two_cpu_processes(ddp_runs):
    run_dir, _, out = ddp_runs
    for name, step in (("at-3.ckpt", 3), ("last.ckpt", 6)):
        state = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert state["global_step"] == step, name
        assert state["tokens_seen"] == step * 2 * 2 * 32, name  # steps x ranks x batch x seq_len
        sampler = state["GPTDataModule"]["train_sampler"]
        assert sampler["world_size"] == 2 and sampler["consumed"] == step * 2 * 2, name
    assert "val bits/byte" in out and "--- sample" in out


class MicroBatchLosses(L.Callback):
    """The loss of every micro-batch, by the optimizer step it belongs to."""

    def __init__(self):
        self.by_step: dict[int, list[float]] = defaultdict(list)
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step + 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning's output is the micro-batch's mean loss divided by the accumulation count
        self.by_step[self._step].append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


@pytest.fixture(scope="module")
def accumulated_run(tmp_path_factory, cache_dir, corpus):
    """4 optimizer steps of 2 micro-batches (global_batch_size 4 of 2 x 32 tokens), validation
    every 2 steps: the run's summary, folder and micro-batch losses."""
    run_dir = tmp_path_factory.mktemp("accumulated")
    losses = MicroBatchLosses()
    cfg = compose_config(
        [
            *tiny_overrides(corpus, cache_dir, run_dir),
            "global_batch_size=4",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "sample.max_new_tokens=0",
        ]
    )
    with pytest.MonkeyPatch.context() as patch:
        add_callbacks(patch, losses)
        summary = train(cfg)
    return summary, run_dir, losses.by_step


def test_every_loss_shown_under_accumulation_is_the_steps_mean_per_token(accumulated_run):
    summary, run_dir, micro = accumulated_run
    assert {step: len(values) for step, values in micro.items()} == {1: 2, 2: 2, 3: 2, 4: 2}
    want = {step: sum(values) / len(values) for step, values in micro.items()}  # equal tokens
    curve = losses_by_step(run_dir)
    assert curve == pytest.approx(want, rel=1e-6)
    with open(run_dir / "csv" / "metrics.csv") as f:
        logged = {
            int(r["step"]) + 1: float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }
    assert logged == pytest.approx(want, rel=1e-6)  # Lightning logs step k at k - 1
    assert summary["train_loss"] == pytest.approx(want[4], rel=1e-6)


def test_validation_interval_counts_optimizer_steps(accumulated_run):
    _, run_dir, _ = accumulated_run
    with open(run_dir / "losses.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert val_steps == [2, 4]  # trainer.val_check_interval=2 steps of 2 micro-batches
