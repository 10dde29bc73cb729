"""SIGTERM (preemption, ``scancel``, ``kill``) and SIGINT (Ctrl-C): finish the optimizer step,
save ``last.ckpt``, print the command that resumes, exit with 128 + the signal number (143
for SIGTERM, 130 for SIGINT) so a scheduler sees that the run did not finish."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from training.callbacks import OptimizerStepCallback
from training.run_folder import resume_command

log = logging.getLogger(__name__)


class StoppedBySignal(SystemExit):
    """The run stopped on a signal after saving its checkpoint; the exit status is 128 + the
    signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignalCheckpoint(OptimizerStepCallback, Checkpoint):
    """On SIGTERM or SIGINT, save ``dirpath/filename`` after the current optimizer step and
    raise :class:`StoppedBySignal`. A second SIGINT interrupts at once.

    SIGTERM is seen through Lightning's handler (``trainer.received_sigterm``, which also
    forwards it to the processes Lightning launched); SIGINT through a handler installed for
    the fit. All ranks stop at the same step when any rank received a signal. A Checkpoint
    subclass, so Lightning runs it after the other callbacks have recorded the step. The stop
    is raised at the next hook, after Lightning has logged the step's metrics (it logs them
    after on_train_batch_end), so the step's row is in the logs the resumed run continues.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = f"{str(dirpath).rstrip('/')}/{filename}"
        self._sigint = False
        self._previous_handler = None
        self.saved_for = 0  # the signal the checkpoint was saved for (0: none yet)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # Not in setup(): Lightning records every signal handler after setup and puts them
        # back when the fit ends, which would leave this one installed.
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        self._stop_if_saved()  # the signal came at the last step

    def _restore_sigint(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _on_sigint(self, signum, frame) -> None:
        if self._sigint:
            raise KeyboardInterrupt
        self._sigint = True
        log.warning("SIGINT: stopping after this step (press Ctrl-C again to stop at once)")

    def _received(self, trainer) -> int:
        """The signal any rank received (0: none)."""
        local = signal.SIGTERM if trainer.received_sigterm else signal.SIGINT if self._sigint else 0
        decision = trainer.strategy.reduce(
            torch.tensor(int(local), device=trainer.strategy.root_device), reduce_op="max"
        )
        return int(decision)

    def _save(self, trainer, signum: int) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state
        self.saved_for = signum
        log.warning(
            "%s: saved %s at step %d, stopping",
            signal.Signals(signum).name,
            self.path,
            trainer.global_step,
        )

    def on_optimizer_step_end(self, trainer, outputs) -> None:
        signum = self._received(trainer)
        if signum and not self.saved_for:
            self._save(trainer, signum)

    def _stop_if_saved(self) -> None:
        if self.saved_for:
            raise StoppedBySignal(self.saved_for)

    # The first of these hooks after the step's metrics are logged stops the run: the next
    # batch, a validation (not run: the checkpoint is saved), the end of the epoch or of training.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_saved()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Lightning stops a validation (and DDP ranks at a batch start) on SIGTERM itself.
        if isinstance(exception, SIGTERMException) and not self.saved_for:
            self._save(trainer, signal.SIGTERM)
        self._restore_sigint()


@contextmanager
def exit_status_on_stop_signal(run_dir: Path):
    """Around ``trainer.fit``: a stop by signal leaves as :class:`StoppedBySignal` (Lightning's
    own SIGTERMException exits with status 0) after logging the command that resumes."""
    try:
        yield
    except (StoppedBySignal, SIGTERMException) as stop:
        signum = getattr(stop, "signum", signal.SIGTERM)
        if rank_zero_only.rank == 0:
            name = signal.Signals(signum).name
            log.warning("stopped by %s; resume with:\n  %s", name, resume_command(run_dir))
        raise StoppedBySignal(signum) from None
