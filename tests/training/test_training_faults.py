"""Faults injected on purpose: kills mid-training, damaged and crafted checkpoints, stop
signals, a second run in a used folder, moved run folders, remote checkpoint paths."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from training_testing import (
    CONFIG_DIR,
    add_callbacks,
    checkpoint_step,
    compose_config,
    losses_by_step,
    metric_steps,
    run_train_py,
    slow_run_args,
    slow_run_overrides,
    tiny_overrides,
    wait_for,
)

from training.checkpointing import (
    CheckpointError,
    DiskFullError,
    VerifiedCheckpointIO,
    intact_checkpoint,
    verified_step,
)
from training.run_folder import (
    RunFolderHasCheckpoints,
    RunFolderInUse,
    resolve_resume,
    resume_command,
    run_dir_chosen,
    run_folder_lock,
)
from training.stop_signals import StoppedBySignal
from training.train import train


def _kill_at_step(args, cache_dir, last: Path, step: int) -> int:
    """Run train.py until it SIGKILLs itself after optimizer step ``step``; the step that
    last.ckpt then holds."""
    kill = [
        "+callbacks.kill._target_=tests.training.kill_at_step.KillAtStep",
        f"+callbacks.kill.step={step}",
    ]
    proc = run_train_py([*args, *kill], cache_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return checkpoint_step(last)


def test_kill_twice_then_resume_keeps_the_whole_history(tmp_path, cache_dir, corpus):
    steps = 16
    run_dir = tmp_path / "killed"
    args = [*slow_run_args(corpus, cache_dir, run_dir, steps), "ckpt_path=last"]
    run_dir.mkdir()  # a job that resumes from its first start: its folder exists
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
    assert metric_steps(run_dir, "train/loss") == list(range(steps))
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
    overrides = [
        *tiny_overrides(corpus, cache_dir, run_dir),
        "trainer.max_steps=4",
        "trainer.val_check_interval=3",
        "scheduler.total_steps=6",
        "sample.max_new_tokens=0",
    ]
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
    summary = train(
        compose_config(
            [
                *tiny_overrides(corpus, cache_dir, run_dir),
                "trainer.max_steps=5",
                "trainer.val_check_interval=3",
                "scheduler.total_steps=6",
                "sample.max_new_tokens=0",
                "ckpt_path=last",
            ]
        )
    )
    assert summary["global_step"] == 5
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4, 5]  # 4 and 5 trained again
    assert metric_steps(run_dir, "train/loss") == [0, 1, 2, 3, 4]


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
    return metrics.is_file() and bool(metric_steps(run_dir, "train/loss"))


def test_sigterm_saves_prints_the_resume_command_and_exits_143(tmp_path, cache_dir, corpus):
    run_dir = tmp_path / "run"
    args = [
        *slow_run_args(corpus, cache_dir, run_dir, 100_000),
        "callbacks.last_checkpoint.every_n_train_steps=100000",
    ]
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
    add_callbacks(monkeypatch, _SignalAtStep(signal.SIGINT, 2))
    # The handler before the run: Python's default_int_handler, or SIG_IGN where the shell
    # started the tests in the background.
    before = signal.getsignal(signal.SIGINT)
    cfg = compose_config([*tiny_overrides(corpus, cache_dir, tmp_path), "trainer.max_steps=5"])
    with pytest.raises(StoppedBySignal) as stop:
        train(cfg)
    assert stop.value.code == 130  # 128 + SIGINT
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert f"ckpt_path=last hydra.run.dir={tmp_path}" in caplog.text
    assert sorted(losses_by_step(tmp_path)) == [1, 2]
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_moved_run_folder_resumes_and_overwrites_last_ckpt(
    finished_run, tmp_path, cache_dir, corpus
):
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    summary = train(
        compose_config(
            [
                *tiny_overrides(corpus, cache_dir, moved),
                "trainer.max_steps=6",
                "trainer.val_check_interval=3",
                "scheduler.total_steps=6",
                "sample.max_new_tokens=0",
                "ckpt_path=last",
            ]
        )
    )
    assert summary["global_step"] == 6
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and checkpoint_step(moved / "checkpoints" / "last.ckpt") == 6
    assert sorted(losses_by_step(moved)) == list(range(1, 7))
    assert metric_steps(moved, "train/loss") == list(range(6))


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


def _finished_run_overrides(corpus, cache_dir, run_dir: Path, steps: int) -> list[str]:
    """finished_run's settings in run_dir, for steps optimizer steps."""
    return [
        *tiny_overrides(corpus, cache_dir, run_dir),
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3",
        "scheduler.total_steps=6",
        "sample.max_new_tokens=0",
    ]


def test_fresh_run_in_a_finished_run_folder_is_refused(finished_run, tmp_path, cache_dir, corpus):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    folder = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fresh = _finished_run_overrides(corpus, cache_dir, run_dir, 2)
    with pytest.raises(RunFolderHasCheckpoints) as refused:
        train(compose_config(fresh))
    message = str(refused.value)
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in message  # resume it
    assert "hydra.run.dir=<another folder>" in message  # or start elsewhere
    assert "overwrite_run_folder=true" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    summary = train(compose_config([*fresh, "overwrite_run_folder=true"]))
    assert summary["global_step"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # the earlier run's: gone
    assert checkpoint_step(folder / "last.ckpt") == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_by_signal_then_resume_logs_every_step_once(
    signum, tmp_path, cache_dir, corpus, monkeypatch
):
    overrides = [
        *tiny_overrides(corpus, cache_dir, tmp_path),
        "trainer.max_steps=4",
        "trainer.val_check_interval=100",
        "sample.max_new_tokens=0",
    ]
    with monkeypatch.context() as patch:
        add_callbacks(patch, _SignalAtStep(signum, 2))
        with pytest.raises(StoppedBySignal):
            train(compose_config(overrides))
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert train(compose_config([*overrides, "ckpt_path=last"]))["global_step"] == 4
    # Lightning logs step k's metrics at step k - 1: the stop step's row is there, once
    assert metric_steps(tmp_path, "train/loss") == [0, 1, 2, 3]


def test_last_with_a_folder_that_never_existed_names_it(tmp_path, cache_dir, corpus):
    typo = tmp_path / "runs" / "typo"
    overrides = [
        *tiny_overrides(corpus, cache_dir, typo),
        "ckpt_path=last",
        "sample.max_new_tokens=0",
    ]
    with pytest.raises(FileNotFoundError, match=f"run folder {typo} does not exist"):
        train(compose_config(overrides))
    assert not typo.exists()
    typo.mkdir(parents=True)  # a requeued job's folder, before its first checkpoint
    assert train(compose_config(overrides))["global_step"] == 2


def test_last_with_a_new_hydra_run_dir_fails_before_creating_it(tmp_path, cache_dir, corpus):
    typo = tmp_path / "typo"
    args = [o for o in tiny_overrides(corpus, cache_dir, typo) if not o.startswith("paths.")]
    proc = run_train_py([*args, f"hydra.run.dir={typo}", "ckpt_path=last"], cache_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"ckpt_path=last: the run folder {typo} does not exist" in out, out[-3000:]
    assert not typo.exists()


def _export(checkpoint: Path, out: Path) -> Path:
    import export_hf  # scripts/ is on pytest's path

    return Path(export_hf.main([str(checkpoint), str(out)]))


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_export_verifies_the_checkpoint_as_resume_does(how, finished_run, tmp_path):
    damaged = tmp_path / "last.ckpt"
    shutil.copy(finished_run / "checkpoints" / "last.ckpt", damaged)
    _damage(damaged, how)
    problem = "CRC-32" if how == "overwritten" else "not a complete checkpoint archive"
    with pytest.raises(CheckpointError, match=f"checkpoint {damaged} is damaged: .*{problem}"):
        _export(damaged, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_of_a_file_that_is_not_a_checkpoint_never_suggests_unsafe_loading(tmp_path):
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _WritesAFile(tmp_path / "code_ran.txt")}, crafted)
    notes = tmp_path / "notes.txt"
    notes.write_text("some text, not a checkpoint\n")
    for path in (crafted, notes):
        with pytest.raises(CheckpointError, match=str(path)) as refused:
            _export(path, tmp_path / "out")
        assert "weights_only=False" not in str(refused.value)
        assert "weights_only` set to `False`" not in str(refused.value)
        assert "safe_globals" not in str(refused.value)
    assert not (tmp_path / "code_ran.txt").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_save_says_so_and_keeps_the_previous_checkpoint(
    finished_run, tmp_path, cache_dir, corpus
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # the next save of last.ckpt writes its temporary file into /dev/full: ENOSPC
    (last.parent / f".last.ckpt.{os.getpid()}.tmp").symlink_to("/dev/full")
    resume = [*_finished_run_overrides(corpus, cache_dir, run_dir, 5), "ckpt_path=last"]
    with pytest.raises(DiskFullError) as full:
        train(compose_config(resume))
    message = str(full.value)
    assert "the disk is full" in message and f"save checkpoint {last}" in message
    assert f"free in {last.parent}" in message
    assert f"the previous checkpoint {last} is intact" in message
    assert last.read_bytes() == before
    assert verified_step(last) == 4
    assert not list(last.parent.glob(".*.tmp"))  # the temporary file (here a link) is gone
