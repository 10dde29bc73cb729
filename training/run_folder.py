"""The run folder: one run at a time (a lock), which checkpoint a run resumes from, and the
command that resumes it."""

from __future__ import annotations

import logging
import os
import shlex
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from training.checkpointing import Resume, intact_checkpoint, is_local, latest_checkpoint

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunFolderInUse(RuntimeError):
    """Another run holds the run folder's lock."""


def _is_launching_process() -> bool:
    """Whether this process is global rank 0 (the one that holds the lock): the ranks that
    Lightning or a cluster launcher starts carry their rank in the environment."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"):
        if os.environ.get(name, "0") != "0":
            return False
    return True


@contextmanager
def run_folder_lock(run_dir: Path):
    """Hold ``<run_dir>/run.lock`` for the duration; RunFolderInUse at once when another run
    holds it (two runs in one folder would overwrite each other's checkpoints and logs)."""
    if not _is_launching_process():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderInUse(
            f"run folder {run_dir} is in use by another run (it holds {run_dir / LOCK_NAME}); "
            "wait for that run to end, or choose another folder with hydra.run.dir=..."
        ) from None
    try:
        yield
    finally:
        lock.release()


def run_dir_chosen() -> bool:
    """Whether the run folder was chosen by the caller (hydra.run.dir or paths.output_dir on
    the command line, or train() called without Hydra) rather than made up from the time."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    overrides = HydraConfig.get().overrides
    keys = [o.split("=", 1)[0].lstrip("+~") for o in [*overrides.hydra, *overrides.task]]
    return "hydra.run.dir" in keys or "paths.output_dir" in keys


def resume_command(run_dir: Path) -> str:
    """The command line that resumes the run in run_dir: this run's overrides, with
    ``ckpt_path=last hydra.run.dir=<run_dir>``."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        skip = ("ckpt_path", "hydra.run.dir", "paths.output_dir")
        overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] not in skip]
    args = [*overrides, "ckpt_path=last", f"hydra.run.dir={run_dir}"]
    return shlex.join(["python", "train.py", *args])


def _latest_run_with_checkpoints(runs_root: Path) -> Path | None:
    """The run folder under runs_root whose newest checkpoint is the newest."""
    newest = {}
    for ckpt in runs_root.glob("*/checkpoints/*.ckpt"):
        run = ckpt.parent.parent
        newest[run] = max(newest.get(run, 0.0), ckpt.stat().st_mtime)
    return max(newest, key=newest.get) if newest else None


def resolve_resume(ckpt_path, run_dir: Path, chosen_run_dir: bool) -> Resume | None:
    """The checkpoint a run starts from, verified (see :func:`intact_checkpoint`).

    ckpt_path: None (fresh start), a checkpoint path or URL, or "last": the newest intact
    checkpoint of ``run_dir/checkpoints`` (none yet: a fresh start when run_dir was chosen,
    so a requeued job's first start works; else ValueError with the command that resumes the
    latest run of the experiment, since a new timestamped folder never holds a checkpoint).
    """
    if ckpt_path in (None, "", "none", "null"):
        return None
    if not isinstance(ckpt_path, (str, os.PathLike)):
        raise TypeError(f"ckpt_path must be a path, 'last' or null, got {ckpt_path!r}")
    if str(ckpt_path) != "last":
        if is_local(ckpt_path) and not Path(ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
        return intact_checkpoint(ckpt_path)
    resume = latest_checkpoint(run_dir / "checkpoints")
    if resume is not None:
        log.info("ckpt_path=last: resuming from %s (step %d)", resume.path, resume.step)
        return resume
    if chosen_run_dir:
        log.info("ckpt_path=last: no checkpoint in %s yet, starting from scratch", run_dir)
        return None
    latest = _latest_run_with_checkpoints(run_dir.parent)
    if latest is None:
        raise ValueError(
            f"ckpt_path=last: no run under {run_dir.parent} has a checkpoint; name the run "
            "folder to resume with hydra.run.dir=<run folder>"
        )
    raise ValueError(
        "ckpt_path=last resumes the run folder given by hydra.run.dir; the latest run of this "
        f"experiment is {latest}, resumed by:\n  {resume_command(latest)}"
    )
