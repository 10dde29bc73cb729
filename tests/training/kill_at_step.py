"""A hard crash at a known step, for fault tests: ``+callbacks.kill._target_=
tests.training.kill_at_step.KillAtStep +callbacks.kill.step=N`` SIGKILLs train.py (no handler,
no cleanup, as a scheduler's kill -9) once optimizer step N is done, whatever the machine's
speed."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
