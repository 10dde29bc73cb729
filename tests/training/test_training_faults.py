"""Faults injected on purpose: kills mid-training, damaged and crafted checkpoints, stop
signals, a second run in a used folder, moved run folders, remote checkpoint paths."""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from training_testing import (
    CONFIG_DIR,
    checkpoint_step,
    compose_config,
    losses_by_step,
    run_train_py,
    slow_run_args,
    slow_run_overrides,
    tiny_overrides,
    wait_for,
)

from training.checkpointing import CheckpointError, VerifiedCheckpointIO, intact_checkpoint
from training.run_folder import (
    RunFolderInUse,
    resolve_resume,
    resume_command,
    run_dir_chosen,
    run_folder_lock,
)
from training.stop_signals import StoppedBySignal
from training.train import train


def _metric_steps(run_dir: Path, key: str) -> list[int]:
    """The steps of metrics.csv's rows that hold key, in file order."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def _kill_at_step(args, cache_dir, last: Path, step: int) -> int:
    """Run train.py until it SIGKILLs itself after optimizer step ``step``; the step that
    last.ckpt then holds."""
    kill = ["+callbacks.kill._target_=tests.training.kill_at_step.KillAtStep",
            f"+callbacks.kill.step={step}"]  # fmt: skip
    proc = run_train_py([*args, *kill], cache_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return checkpoint_step(last)


def test_kill_twice_then_resume_keeps_the_whole_history(tmp_path, cache_dir, corpus):
    steps = 16
    run_dir = tmp_path / "killed"
    args = [*slow_run_args(corpus, cache_dir, run_dir, steps), "ckpt_path=last"]
    last = run_dir / "checkpoints" / "last.ckpt"
    first = _kill_at_step(args, cache_dir, last, 6)  # checkpoints every 4 steps
    second = _kill_at_step(args, cache_dir, last, 10)
    assert (first, second) == (4, 8)
    # the last resume and the uninterrupted reference run in this process (no start-up)
    overrides = slow_run_overrides(corpus, cache_dir, run_dir, steps)
    assert train(compose_config([*overrides, "ckpt_path=last"]))["global_step"] == steps
    train(compose_config(slow_run_overrides(corpus, cache_dir, tmp_path / "ref", steps)))
    want, got = losses_by_step(tmp_path / "ref"), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    # Lightning logs step k's metrics at step k - 1: every step once, in order
    assert _metric_steps(run_dir, "train/loss") == list(range(steps))
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    else:  # 4 KiB overwritten in the middle
        middle = len(data) // 2
        path.write_bytes(data[:middle] + os.urandom(4096) + data[middle + 4096 :])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir, corpus) -> Path:
    """A 4-step run with last.ckpt (step 4) and best-step=000003.ckpt (step 3)."""
    run_dir = tmp_path_factory.mktemp("finished")
    overrides = [*tiny_overrides(corpus, cache_dir, run_dir), "trainer.max_steps=4",
                 "trainer.val_check_interval=3", "scheduler.total_steps=6",
                 "sample.max_new_tokens=0"]  # fmt: skip
    train(compose_config(overrides))
    return run_dir


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "overwritten"])
def test_damaged_last_checkpoint_falls_back_to_the_newest_intact(
    how, finished_run, tmp_path, caplog
):
    folder = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", folder)
    _damage(folder / "last.ckpt", how)
    resume = resolve_resume("last", tmp_path, chosen_run_dir=True)
    assert resume.path == str(folder / "best-step=000003.ckpt") and resume.step == 3
    assert f"checkpoint {folder / 'last.ckpt'} is damaged" in caplog.text
    assert "newest intact checkpoint" in caplog.text
    _damage(folder / "best-step=000003.ckpt", "overwritten")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resolve_resume("last", tmp_path, chosen_run_dir=True)


def test_resume_with_damaged_last_checkpoint_trains_from_the_intact_one(
    finished_run, tmp_path, cache_dir, corpus
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    _damage(run_dir / "checkpoints" / "last.ckpt", "overwritten")
    summary = train(compose_config([
        *tiny_overrides(corpus, cache_dir, run_dir), "trainer.max_steps=5",
        "trainer.val_check_interval=3", "scheduler.total_steps=6", "sample.max_new_tokens=0",
        "ckpt_path=last",
    ]))  # fmt: skip
    assert summary["global_step"] == 5
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4, 5]  # 4 and 5 trained again
    assert _metric_steps(run_dir, "train/loss") == [0, 1, 2, 3, 4]


def test_last_means_the_highest_step_of_the_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 150}, folder / "best-000150.ckpt")
    torch.save({"global_step": 100}, folder / "last.ckpt")  # saved every 100 steps, later
    resume = resolve_resume("last", tmp_path, chosen_run_dir=True)
    assert (resume.path, resume.step) == (str(folder / "best-000150.ckpt"), 150)


class _WritesAFile:
    """Unpickling it would create the file named by path."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_crafted_pickle_in_a_checkpoint_does_not_run(tmp_path, caplog):
    marker = tmp_path / "code_ran.txt"
    crafted = tmp_path / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir()
    torch.save({"global_step": 9, "payload": _WritesAFile(marker)}, crafted)
    with pytest.raises(CheckpointError, match="weights_only"):
        VerifiedCheckpointIO().load_checkpoint(crafted)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        intact_checkpoint(crafted)
    assert "last.ckpt holds objects that weights_only loading refuses" in caplog.text
    assert not marker.exists()


def test_remote_checkpoint_paths_use_fsspec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    io = VerifiedCheckpointIO()
    url = "memory://bucket/run/last.ckpt"
    io.save_checkpoint({"global_step": 7, "w": torch.arange(3)}, url)
    assert not list(tmp_path.iterdir())  # no local folder named after the URL
    assert io.load_checkpoint(url)["global_step"] == 7
    assert intact_checkpoint(url).step == 7


def test_second_run_in_a_locked_folder_exits_at_once(tmp_path, cache_dir, corpus):
    cfg = compose_config(tiny_overrides(corpus, cache_dir, tmp_path))
    with run_folder_lock(tmp_path), pytest.raises(RunFolderInUse, match=str(tmp_path)):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def _training_started(run_dir: Path) -> bool:
    metrics = run_dir / "csv" / "metrics.csv"
    return metrics.is_file() and bool(_metric_steps(run_dir, "train/loss"))


def test_sigterm_saves_prints_the_resume_command_and_exits_143(tmp_path, cache_dir, corpus):
    run_dir = tmp_path / "run"
    args = [*slow_run_args(corpus, cache_dir, run_dir, 100_000),
            "callbacks.last_checkpoint.every_n_train_steps=100000"]  # fmt: skip
    proc = run_train_py(args, cache_dir)
    assert wait_for(lambda: _training_started(run_dir), proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: the scheduler sees a failure
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"SIGTERM: saved {last}" in out, out[-3000:]
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in out
    assert 0 < checkpoint_step(last) < 100_000
    assert losses_by_step(run_dir)  # the curve was written on the way out


class _SignalAtStep(L.Callback):
    """Sends this process signum after the optimizer step `step` (as Ctrl-C would)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_saves_and_exits_130(tmp_path, cache_dir, corpus, monkeypatch, caplog):
    real_instantiate = hydra.utils.instantiate

    def with_sigint_at_step_2(config, *args, **kwargs):
        if kwargs.get("callbacks"):
            kwargs["callbacks"] = [*kwargs["callbacks"], _SignalAtStep(signal.SIGINT, 2)]
        return real_instantiate(config, *args, **kwargs)

    monkeypatch.setattr(hydra.utils, "instantiate", with_sigint_at_step_2)
    cfg = compose_config([*tiny_overrides(corpus, cache_dir, tmp_path), "trainer.max_steps=5"])
    with pytest.raises(StoppedBySignal) as stop:
        train(cfg)
    assert stop.value.code == 130  # 128 + SIGINT
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert f"ckpt_path=last hydra.run.dir={tmp_path}" in caplog.text
    assert sorted(losses_by_step(tmp_path)) == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_moved_run_folder_resumes_and_overwrites_last_ckpt(finished_run, tmp_path, cache_dir,
                                                          corpus):  # fmt: skip
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    summary = train(compose_config([
        *tiny_overrides(corpus, cache_dir, moved), "trainer.max_steps=6",
        "trainer.val_check_interval=3", "scheduler.total_steps=6", "sample.max_new_tokens=0",
        "ckpt_path=last",
    ]))  # fmt: skip
    assert summary["global_step"] == 6
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and checkpoint_step(moved / "checkpoints" / "last.ckpt") == 6
    assert sorted(losses_by_step(moved)) == list(range(1, 7))
    assert _metric_steps(moved, "train/loss") == list(range(6))


def test_last_without_run_folder_names_the_command(finished_run, tmp_path):
    runs = tmp_path / "outputs" / "train"  # Hydra's default: one timestamped folder per run
    shutil.copytree(finished_run, runs / "2026-01-01_00-00-00")
    with pytest.raises(ValueError, match=f"hydra.run.dir={runs / '2026-01-01_00-00-00'}"):
        resolve_resume("last", runs / "2026-01-02_00-00-00", chosen_run_dir=False)
    with pytest.raises(ValueError, match="no run under"):
        resolve_resume("last", tmp_path / "fresh" / "run", chosen_run_dir=False)
    assert resolve_resume("last", tmp_path / "fresh" / "run", chosen_run_dir=True) is None


@pytest.mark.parametrize(
    "overrides, chosen",
    [([], False), (["hydra.run.dir=/runs/a"], True), (["paths.output_dir=/runs/a"], True)],
)
def test_run_folder_counts_as_chosen_only_when_named(overrides, chosen):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", [*overrides, "trainer.max_steps=7"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert run_dir_chosen() is chosen
        command = resume_command(Path("/runs/b"))
    finally:
        HydraConfig.instance().cfg = None
    assert command == "python train.py trainer.max_steps=7 ckpt_path=last hydra.run.dir=/runs/b"
