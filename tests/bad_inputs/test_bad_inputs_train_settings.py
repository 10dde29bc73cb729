"""Bad train.py settings: train() stops before building anything, with a TypeError or
ValueError that names the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.bad_inputs_testing import assert_rejected
from training.train import train

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

SETTING_CASES = [
    ("data.source.val_fraction=0", ValueError, "data.source.val_fraction"),
    ("data.source.val_fraction=1.5", ValueError, "data.source.val_fraction"),
    ("data.batch_size=0", ValueError, "data.batch_size"),
    ("data.batch_size=two", TypeError, "data.batch_size"),
    ("data.seq_len=-1", ValueError, "data.seq_len"),
    ("global_batch_size=0", ValueError, "global_batch_size"),
    ("trainer.max_steps=0", ValueError, "trainer.max_steps"),
    ("trainer.max_steps=1.5", TypeError, "trainer.max_steps"),
    ("trainer.log_every_n_steps=0", ValueError, "trainer.log_every_n_steps"),
    ("callbacks.last_checkpoint.every_n_train_steps=0", ValueError, "every_n_train_steps"),
    ("sample.temperature=nan", ValueError, "sample.temperature"),
    ("sample.top_k=-1", ValueError, "sample.top_k"),
    ("sample.max_new_tokens=-5", ValueError, "sample.max_new_tokens"),
    ("cpu_threads=0", ValueError, "cpu_threads"),
    ("cpu_threads=many", TypeError, "cpu_threads"),
    ("matmul_precision=low", ValueError, "matmul_precision"),
    ("save_final_checkpoint=maybe", TypeError, "save_final_checkpoint"),
    ("seed=abc", TypeError, "seed"),
    ("ckpt_path=5", TypeError, "ckpt_path"),
    ("optimizer.lr=0", ValueError, "optimizer.lr"),
    ("optimizer.betas=[0.9]", TypeError, "optimizer.betas"),
    ("scheduler.decay=step", ValueError, "scheduler.decay"),
    ("scheduler.warmup_fraction=2", ValueError, "scheduler.warmup_fraction"),
    ("+optimizer.momentum=0.9", ValueError, "optimizer.momentum"),
    ("model.compile=maybe", TypeError, "model.compile"),
]


def _config(tmp_path: Path, override: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=[f"paths.output_dir={tmp_path}", override])


@pytest.mark.parametrize("override, error, name", SETTING_CASES)
def test_train_rejects_setting(override, error, name, tmp_path):
    cfg = _config(tmp_path / "run", override)
    assert_rejected(lambda: train(cfg), error, name)
    assert not (tmp_path / "run").exists()  # nothing was built or locked


@pytest.mark.parametrize(
    "override, error, name",
    [
        ("model.config.n_layer=0", ValueError, "n_layer"),
        ("model.config.n_head=3", ValueError, "n_head"),
        ("ckpt_path=/no/such/last.ckpt", FileNotFoundError, "/no/such/last.ckpt"),
    ],
)
def test_train_rejects_model_and_checkpoint_settings(override, error, name, tmp_path):
    cfg = _config(tmp_path / "run", override)
    cfg.data.source.max_bytes = 20_000  # the quickstart corpus, small
    cfg.paths.cache_dir = str(tmp_path / "cache")
    cfg.data.tokenizer.kind = "bytes"
    assert_rejected(lambda: train(cfg), error, name)
