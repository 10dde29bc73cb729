"""The progress bar counts optimizer steps, also under gradient accumulation."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from training.progress import StepProgressBar


def test_bar_counts_optimizer_steps_under_accumulation(tmp_path):
    bar = StepProgressBar(refresh_rate=1)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=5,
        accumulate_grad_batches=3,
        limit_train_batches=4,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    # 15 micro-batches over 4 epochs of 4; one bar of 5 steps, so tqdm knows the ETA
    assert trainer.global_step == 5
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (5, 5)
    assert bar.train_progress_bar.desc.startswith("Steps")
