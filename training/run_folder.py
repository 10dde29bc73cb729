"""The run folder: one run at a time (a lock), which checkpoint a run resumes from, the
command that resumes it, and the checks that keep a run from replacing another's checkpoints
or resuming a folder that does not exist."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback

from training.checkpointing import Resume, intact_checkpoint, is_local, latest_checkpoint

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunFolderInUse(RuntimeError):
    """Another run holds the run folder's lock."""


class RunFolderHasCheckpoints(RuntimeError):
    """A fresh start would replace the checkpoints an earlier run left in the run folder."""


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


def _overridden_keys(hydra_cfg) -> set[str]:
    """The keys given on the command line, from a composed config's ``hydra`` node."""
    overrides = hydra_cfg.overrides
    return {o.split("=", 1)[0].lstrip("+~") for o in [*overrides.hydra, *overrides.task]}


def run_dir_chosen() -> bool:
    """Whether the run folder was chosen by the caller (hydra.run.dir or paths.output_dir on
    the command line, or train() called without Hydra) rather than made up from the time."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return bool({"hydra.run.dir", "paths.output_dir"} & _overridden_keys(HydraConfig.get()))


def train_command(*args: str) -> str:
    """The command line of this run with args in place of its ckpt_path and run folder."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        skip = ("ckpt_path", "hydra.run.dir", "paths.output_dir")
        overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] not in skip]
    return shlex.join(["python", "train.py", *overrides, *args])


def resume_command(run_dir: Path) -> str:
    """The command line that resumes the run in run_dir: this run's overrides, with
    ``ckpt_path=last hydra.run.dir=<run_dir>``."""
    return train_command("ckpt_path=last", f"hydra.run.dir={run_dir}")


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """Before a fresh start (no checkpoint to resume) in run_dir: RunFolderHasCheckpoints when
    ``run_dir/checkpoints`` holds an earlier run's checkpoints, with the commands that resume
    that run or start in another folder. overwrite (``overwrite_run_folder=true``) deletes
    them instead, with a warning. Only the launching process checks (see run_folder_lock)."""
    earlier = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if not earlier or not _is_launching_process():
        return
    names = ", ".join(p.name for p in earlier)
    if not overwrite:
        raise RunFolderHasCheckpoints(
            f"run folder {run_dir} holds the checkpoints of an earlier run ({names}); a fresh "
            f"start would replace them. Resume that run:\n  {resume_command(run_dir)}\nor start "
            f"in another folder:\n  {train_command()} hydra.run.dir=<another folder>\n"
            "(overwrite_run_folder=true starts over in this folder, deleting them)"
        )
    log.warning("overwrite_run_folder=true: deleting the earlier run's checkpoints %s", names)
    for path in earlier:
        if path.is_dir():  # a sharded checkpoint
            shutil.rmtree(path)
        else:
            path.unlink()


# Run folders given by hydra.run.dir that did not exist when their run started in this process:
# Hydra creates the folder before train() runs (see ResumeFolderCheck).
_CREATED_BY_HYDRA: set[Path] = set()


def check_resume_folder_exists(ckpt_path, run_dir: Path) -> None:
    """FileNotFoundError naming run_dir when ckpt_path is "last" and run_dir did not exist
    before this run: a folder that never existed holds no run to resume, so its name is a typo
    (a folder that exists without a checkpoint yet, as a requeued job's, starts fresh). The
    folder Hydra made for the run is removed again, so the same command fails the same way."""
    if str(ckpt_path) != "last":
        return
    created = run_dir.resolve() in _CREATED_BY_HYDRA
    if run_dir.exists() and not created:
        return
    if (
        created
        and run_dir.is_dir()
        and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}
    ):
        shutil.rmtree(run_dir)  # only what Hydra wrote for this run
    raise FileNotFoundError(
        f"ckpt_path=last: the run folder {run_dir} does not exist, so there is no run to "
        "resume; check hydra.run.dir, or leave out ckpt_path=last to start a new run (a job "
        "that passes ckpt_path=last from its first start creates its folder first)"
    )


class ResumeFolderCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/config.yaml): notes a hydra.run.dir given
    by the caller that does not exist yet, before Hydra creates it, for
    :func:`check_resume_folder_exists` (Hydra turns a callback's exception into a warning)."""

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        if "hydra.run.dir" in _overridden_keys(config.hydra) and not run_dir.exists():
            _CREATED_BY_HYDRA.add(run_dir.resolve())


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
