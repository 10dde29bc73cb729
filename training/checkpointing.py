"""Checkpoint files: atomic local writes, verification before every restore, safe loading.

A checkpoint is a zip archive (``torch.save``) whose records carry CRC-32 checksums;
``torch.load`` does not check them, so a file with overwritten bytes loads with damaged
weights. :func:`checkpoint_problem` reads every record and checks its CRC, and every load
uses ``weights_only=True``: our checkpoints hold tensors, containers, numbers and strings only
(the RNG states are stored as plain lists for this reason), which torch's own allow-list
accepts on every supported version, so no extra global needs allowing and a pickle that
would call anything else is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored: damaged, unsafe, or none left to resume from."""


class DiskFullError(OSError):
    """A checkpoint save ran out of disk space; the checkpoint it would replace is intact."""


def is_local(path) -> bool:
    """Whether path is on the local filesystem (a plain path or a file:// URL)."""
    return fsspec.utils.get_protocol(str(path)) in ("file", "local")


# A sharded (FSDP) checkpoint is a folder: torch.distributed.checkpoint's metadata and one
# shard per rank, plus Lightning's meta.pt holding everything but the sharded tensors.
SHARDED_META = "meta.pt"


def is_sharded(path) -> bool:
    """Whether path is a sharded checkpoint folder."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    return fs.isdir(fs_path)


def _stored_state(path) -> str:
    """The file holding a checkpoint's global_step: the checkpoint, or a sharded one's meta.pt."""
    return f"{str(path).rstrip('/')}/{SHARDED_META}" if is_sharded(path) else str(path)


def checkpoint_problem(path) -> str | None:
    """What is wrong with the checkpoint at path (a local path or fsspec URL), None when every
    zip record is present and matches its CRC-32 (for a sharded checkpoint folder: its meta.pt
    and its metadata file are there and meta.pt is intact)."""
    if is_sharded(path):
        fs, fs_path = fsspec.core.url_to_fs(str(path))
        missing = [n for n in (SHARDED_META, ".metadata") if not fs.isfile(f"{fs_path}/{n}")]
        if missing:
            return f"the sharded checkpoint folder lacks {', '.join(missing)}"
        path = _stored_state(path)
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    if not fs.isfile(fs_path):
        return "the file does not exist"
    if fs.size(fs_path) == 0:
        return "the file is empty (0 bytes)"
    try:
        with fs.open(fs_path, "rb") as f, zipfile.ZipFile(f) as archive:
            bad_record = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as err:
        return (
            "not a complete checkpoint archive (truncated, overwritten, or another kind of "
            f"file): {err}"
        )
    if bad_record is not None:
        return f"record {bad_record!r} fails its CRC-32 check (bytes overwritten)"
    return None


def check_intact(path) -> None:
    """CheckpointError naming the file and what is wrong unless :func:`checkpoint_problem`
    finds nothing."""
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def _refused_object(err: pickle.UnpicklingError) -> str:
    """What weights_only unpickling refused, without torch's advice to load the file with
    weights_only=False or to allow the global (either would run what the file asks for)."""
    found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", str(err))
    return found.group(0) if found else "an object outside torch's allow-list"


def read_checkpoint(path, map_location=None, mmap: bool = False) -> dict:
    """torch.load of a checkpoint with weights_only=True; CheckpointError naming the file
    when it holds objects outside torch's allow-list (code would run on unpickling)."""
    try:
        if mmap:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        with fsspec.open(str(path), "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds objects that weights_only loading refuses, so it is not "
            f"restored: {_refused_object(err)}"
        ) from None


def load_verified(path, map_location=None) -> dict:
    """The checkpoint at path after :func:`check_intact` (every record's CRC-32), loaded by
    :func:`read_checkpoint`: the way every resume reads a checkpoint."""
    check_intact(path)
    return read_checkpoint(path, map_location=map_location)


def verified_step(path) -> int:
    """The global_step of the checkpoint at path after checking its records and that it
    unpickles with weights_only=True (tensors memory-mapped, not read); CheckpointError
    naming the file and what is wrong otherwise."""
    check_intact(path)
    state = _stored_state(path)
    checkpoint = read_checkpoint(state, map_location="cpu", mmap=is_local(state))
    return int(checkpoint.get("global_step", 0))


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from and its optimizer step."""

    path: str
    step: int


def _recorded_step(path: Path) -> int:
    """The global_step a checkpoint's pickle records (-1 when it cannot be read); the
    tensors are memory-mapped, not read, so this is cheap even for a large file."""
    try:
        state = _stored_state(path)
        return int(read_checkpoint(state, map_location="cpu", mmap=True).get("global_step", -1))
    except Exception:  # a damaged file: verification says what is wrong with it
        return -1


def _newest_first(folder: Path) -> list[Path]:
    """The folder's checkpoint files, the highest recorded step first (last.ckpt first among
    equals, then the newer file): periodic last.ckpt saves and best-*.ckpt saves interleave,
    and a copied folder's modification times say nothing. Files whose step cannot be read
    come first: they may be the newest, and verifying them reports what is wrong."""
    files = list(folder.glob("*.ckpt"))  # files, or folders of sharded checkpoints
    steps = {p: _recorded_step(p) for p in files}
    rank = {p: (steps[p] < 0, steps[p], p.name == "last.ckpt", p.stat().st_mtime) for p in files}
    return sorted(files, key=rank.get, reverse=True)


def intact_checkpoint(wanted) -> Resume:
    """wanted when it is intact, else the newest intact checkpoint in its folder (saying which
    was damaged and which is used); CheckpointError when there is none."""
    try:
        return Resume(str(wanted), verified_step(wanted))
    except CheckpointError as err:
        damage = str(err)
        if not is_local(wanted):
            raise
    log.error("%s", damage)
    for candidate in _newest_first(Path(wanted).parent):
        if candidate == Path(wanted):
            continue
        try:
            resume = Resume(str(candidate), verified_step(candidate))
        except CheckpointError as err:
            log.error("%s", err)
            continue
        log.warning(
            "resuming from %s (step %d), the newest intact checkpoint in %s, instead",
            candidate,
            resume.step,
            candidate.parent,
        )
        return resume
    raise CheckpointError(f"{damage}; no intact checkpoint in {Path(wanted).parent} to resume")


def latest_checkpoint(folder: Path) -> Resume | None:
    """The newest intact checkpoint (highest step) of a run's checkpoint folder (None when it
    has no checkpoint file)."""
    candidates = _newest_first(folder) if folder.is_dir() else []
    return intact_checkpoint(candidates[0]) if candidates else None


def _write_atomically(checkpoint: dict, path: Path) -> None:
    """torch.save into a temporary file beside path, fsync, rename over path; the temporary
    file is removed when anything fails, leaving path as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_disk_full(err: BaseException) -> bool:
    """Whether err or an error it was raised from is "no space left" (or "quota exceeded"):
    torch's zip writer reports a failed write as ``RuntimeError: ... unexpected pos``, the
    file's own OSError comes with it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_message(path: Path) -> str:
    free = shutil.disk_usage(path.parent).free
    kept = (
        f"the previous checkpoint {path} is intact (a save writes a temporary file first, "
        "now removed)"
        if path.exists()
        else f"no earlier {path.name} was there to replace"
    )
    return (
        f"the disk is full: no space left to save checkpoint {path} ({free / 2**20:.0f} MiB "
        f"free in {path.parent}); {kept}. Free some space there, then resume with "
        "ckpt_path=last."
    )


def _KEEP_DEVICE(storage, location):  # noqa: N802 - Lightning's default map_location
    return storage


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and verified, weights_only loads.

    Local saves go to a temporary file beside the target, fsync, then a rename over it: a
    checkpoint path always holds a complete file, the old or the new one (Lightning's own
    save stages the bytes in the system temp folder and copies them across filesystems, so a
    kill mid-copy leaves a truncated file). Remote paths (s3://, gs://, memory:// ...) are
    written by Lightning's fsspec writer. A local save that runs out of disk space raises
    DiskFullError naming the path (the file there is still the previous checkpoint). Loads
    check every zip record first.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        """Write checkpoint to path; DiskFullError saying where when the disk is full."""
        if not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(fsspec.core.url_to_fs(str(path))[1])
        try:
            _write_atomically(checkpoint, path)
        except (OSError, RuntimeError) as err:
            if not _is_disk_full(err):
                raise
            raise DiskFullError(_disk_full_message(path)) from err

    def load_checkpoint(self, path, map_location=_KEEP_DEVICE, weights_only=None) -> dict:
        """The checkpoint at path, always with weights_only=True (the argument is ignored)."""
        return load_verified(path, map_location=map_location)
