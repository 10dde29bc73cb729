"""Callbacks (throughput and MFU, loss curve, SIGTERM checkpoint) and atomic checkpoint files."""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from training.lightning_module import flops_per_token

log = logging.getLogger(__name__)

# Dense peak tensor FLOP/s per GPU (no sparsity), from the vendors' data sheets.
# Keys are matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device at a Lightning precision ("bf16-mixed", "32", ...), or None
    on CPU and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if "bf16" in precision else "fp16" if "16" in precision else None
    if kind is None:
        kind = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(kind)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then rename over it.

    Lightning's own save writes through fsspec's transaction, which stages the bytes in the
    system temp folder and moves them (a copy when that is another filesystem): a kill
    during the copy leaves a truncated checkpoint. A rename within one folder is atomic, so
    a checkpoint path always holds a complete file, the old or the new one.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
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


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_seen, train/tokens_per_s, train/mfu (None on CPU) and train/ppl every
    log_every_n_steps optimizer steps (averages over the interval: no per-step sync)."""

    def __init__(self, log_every_n_steps: int = 10):
        self.every = max(1, int(log_every_n_steps))
        self.flops_per_token = None
        self.peak = None
        self._t0 = None
        self._tokens0 = 0
        self.last_tokens_per_s = None
        self.last_mfu = None

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        seq_len = trainer.datamodule.seq_len if trainer.datamodule is not None else 1024
        n = model.num_parameters(exclude_embeddings=True)
        self.flops_per_token = flops_per_token(model.config, n, seq_len)
        self.peak = peak_flops(pl_module.device, str(trainer.precision))
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.fit_loop._should_accumulate() or step % self.every or self._t0 is None:
            return
        now = time.perf_counter()
        tokens = pl_module.tokens_seen - self._tokens0
        if tokens <= 0:
            return
        rate = tokens / max(now - self._t0, 1e-9)
        metrics = {"train/tokens_seen": float(pl_module.tokens_seen), "train/tokens_per_s": rate}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            metrics["train/ppl"] = math.exp(min(float(loss), 50.0))
        self.last_tokens_per_s = rate
        if self.peak:
            self.last_mfu = rate * self.flops_per_token / (self.peak * trainer.world_size)
            metrics["train/mfu"] = self.last_mfu
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._tokens0 = now, pl_module.tokens_seen


class LossCurve(L.Callback):
    """Keeps (step, loss) of training (every log_every_n_steps) and validation, and writes
    ``losses.csv`` and ``loss_curve.png`` into the run folder when fitting ends (or fails)."""

    def __init__(self, output_dir: str, log_every_n_steps: int = 10, reference: dict | None = None):
        self.output_dir = Path(output_dir)
        self.every = max(1, int(log_every_n_steps))
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.reference = dict(reference or {})  # label -> horizontal line (e.g. unigram entropy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate() or trainer.global_step % self.every:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
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


class SigtermCheckpoint(L.Callback):
    """On SIGTERM (preemption, ``scancel``, ``kill``), save ``last.ckpt`` after the current
    step and stop; ``ckpt_path=last`` resumes from it. Lightning's signal connector sets
    ``trainer.received_sigterm`` (and broadcasts it to all ranks)."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self.saved = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not getattr(trainer, "received_sigterm", False) or self.saved:
            return
        if trainer.fit_loop._should_accumulate():
            return  # finish the optimizer step first
        trainer.save_checkpoint(self.path)
        self.saved = True
        log.warning("SIGTERM: saved %s at step %d, stopping", self.path, trainer.global_step)
        trainer.should_stop = True
