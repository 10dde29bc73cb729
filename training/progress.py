"""A progress bar over optimizer steps, with an ETA also under gradient accumulation."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar counting optimizer steps towards ``trainer.max_steps``
    (``global_step / max_steps``, one bar for the whole run) instead of the micro-batches of
    each epoch, which under gradient accumulation run past the epoch's total and lose the ETA.
    Takes TQDMProgressBar's arguments (refresh_rate counts steps)."""

    def _total_steps(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return None if total == float("inf") else int(total)

    def on_train_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=self._total_steps(trainer))
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description("Steps")

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """One bar for all epochs: nothing to reset."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
