"""A CSV logger that keeps the run's history across resumes.

Lightning's CSVLogger deletes ``metrics.csv`` when its folder exists, so a resumed run would
lose every row before the resume. :class:`HistoryCSVLogger` keeps the rows of the steps
before the checkpoint it resumes from and drops the rest (a killed run may have logged steps
after its last checkpoint, which the resumed run logs again).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer appending to the rows of steps < history_end already in
    metrics.csv; rows logged for those steps again are dropped (they are in the history)."""

    def __init__(self, log_dir: str, history_end: int):
        self.history_end = history_end
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [r for r in reader if r.get("step") and int(r["step"]) < self.history_end]
            keys = list(reader.fieldnames or [])
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        if step is not None and step < self.history_end:
            return
        super().log_metrics(metrics_dict, step)


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose metrics.csv holds every step from step 0 after any number
    of resumes. Call :meth:`resume_from` with the checkpoint's step before the first log
    (train() does); without it the run starts a new history, as CSVLogger does."""

    _history_end = 0

    def resume_from(self, step: int) -> None:
        """Keep the logged rows of the steps before step (the resumed checkpoint's)."""
        if self._experiment is not None:
            raise RuntimeError("resume_from must be called before the logger writes")
        self._history_end = int(step)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._is_rank_zero():
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._history_end)
        return super().experiment

    @staticmethod
    def _is_rank_zero() -> bool:
        from lightning.pytorch.utilities import rank_zero_only

        return rank_zero_only.rank == 0


def keep_history(loggers: list, resume_step: int) -> None:
    """Tell the loggers that keep a history which step the run starts from (0: fresh)."""
    for logger in loggers:
        if isinstance(logger, HistoryCSVLogger):
            logger.resume_from(resume_step)
