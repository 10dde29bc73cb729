"""Callbacks: throughput and MFU, loss curve (checkpoints and stop signals: checkpointing.py,
stop_signals.py)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from training.data.packing import batch_tokens

log = logging.getLogger(__name__)


def windows_in_batch(batch) -> int:
    """B of a (B, T + 1) batch of token windows (or of a dict batch's "tokens")."""
    return batch_tokens(batch).shape[0]


def tokens_in_batch(batch) -> int:
    """B * T, the tokens trained on in a (B, T + 1) batch of token windows."""
    windows = batch_tokens(batch)
    return windows.shape[0] * (windows.shape[1] - 1)


# Dense peak FLOP/s of GPUs whose names Lightning's table does not match (it knows an H200 only
# as "... SXM1"/"... NVL1", and lists the sparse figure for it): (name fragment, 16-bit, tf32).
_DENSE_PEAK_FLOPS = (("h200", 989.4e12, 494.7e12),)


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, with the dense peak of the GPUs listed in
    ``_DENSE_PEAK_FLOPS`` where Lightning has none, so MFU is reported there too."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if self.available_flops is not None or device.type != "cuda":
            return
        name = torch.cuda.get_device_name(device).lower()
        half = str(trainer.precision).split("-")[0] in ("16", "bf16")  # else tf32 matmuls
        for fragment, half_flops, tf32_flops in _DENSE_PEAK_FLOPS:
            if fragment in name:
                self.available_flops = int(half_flops if half else tf32_flops)
                for throughput in self._throughputs.values():
                    throughput.available_flops = self.available_flops
                return


def throughput_monitor(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor over (B, T + 1) token windows: samples are windows, items
    are the B * T trained tokens, FLOPs come from the module's flops_per_batch. It logs
    train/device/items_per_sec (tokens/s of one device) and, where the device's peak is known
    (not on CPU), train/device/mfu: rolling averages over window_size batches."""
    return TokenThroughputMonitor(
        batch_size_fn=windows_in_batch, length_fn=tokens_in_batch, window_size=window_size
    )


class TrainingSpan(L.Callback):
    """The part of the run that this process trained: from the step it started at (0, or the
    resumed checkpoint's) to the end of training, its tokens (the module's ``tokens_seen``,
    all devices) and seconds (validation included, set-up and data preparation not)."""

    def __init__(self):
        self.first_step: int | None = None
        self.tokens = 0
        self.seconds = 0.0
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step
        self._start = (time.perf_counter(), pl_module.tokens_seen)

    def on_train_end(self, trainer, pl_module) -> None:
        start_time, start_tokens = self._start
        self.seconds = time.perf_counter() - start_time
        self.tokens = pl_module.tokens_seen - start_tokens

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.first_step is None:  # resumed at max_steps: Lightning trained nothing
            self.first_step = trainer.global_step

    @property
    def tokens_per_s(self) -> float | None:
        """tokens / seconds (None when nothing was trained)."""
        return self.tokens / self.seconds if self.seconds > 0 else None


class OptimizerStepCallback(L.Callback):
    """Calls :meth:`on_optimizer_step_end` after the micro-batch whose backward completed an
    optimizer step (the last one of each gradient-accumulation cycle): global_step counts
    optimizer steps, so a change of it marks that batch."""

    _last_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.on_optimizer_step_end(trainer, outputs)

    def on_optimizer_step_end(self, trainer, outputs) -> None:
        """outputs: what training_step returned for the step's last micro-batch."""


class LossCurve(OptimizerStepCallback):
    """Keeps (step, loss) of training (every log_every_n_steps) and validation, and writes
    ``losses.csv`` and ``loss_curve.png`` into the run folder when fitting ends (or fails).
    The training loss is the module's logged ``train/loss``: the step's mean loss per token
    over all its micro-batches. The points are part of the checkpoint, so a resumed run's
    curve starts at step 0."""

    def __init__(self, output_dir: str, log_every_n_steps: int = 10, reference: dict | None = None):
        self.output_dir = Path(output_dir)
        self.every = max(1, int(log_every_n_steps))
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.reference = dict(reference or {})  # label -> horizontal line (e.g. unigram entropy)

    def state_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train = [tuple(point) for point in state_dict["train"]]
        self.val = [tuple(point) for point in state_dict["val"]]

    def on_optimizer_step_end(self, trainer, outputs) -> None:
        if trainer.global_step % self.every:
            return
        # not outputs["loss"]: Lightning divides it by the accumulation count
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: callbacks run it before the module logs val/loss there.
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val.append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.write()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.is_global_zero:
            self.write()

    def write(self) -> Path | None:
        """Write losses.csv and loss_curve.png; returns the PNG path (None without points)."""
        if not self.train and not self.val:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "losses.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "step", "loss"])
            writer.writerows(("train", s, v) for s, v in self.train)
            writer.writerows(("val", s, v) for s, v in self.val)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        if self.train:
            ax.plot(*zip(*self.train), label="train", lw=1)
        if self.val:
            ax.plot(*zip(*self.val), "o-", label="validation", lw=1.5)
        for label, value in self.reference.items():
            ax.axhline(value, ls="--", color="gray", lw=1)
            ax.annotate(label, (0, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.output_dir / "loss_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
