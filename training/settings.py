"""Checks of the train.py settings that are not a class's own arguments, before anything is
built: a TypeError or ValueError naming the setting (``data.batch_size=0`` fails here, not
as a division by zero minutes later). The model's sizes are checked by GPTConfig."""

from __future__ import annotations

from functools import partial

from omegaconf import DictConfig, OmegaConf

from flash_attn.utils.checks import check_bool, check_choice, check_float, check_int


def _cpu_threads(name: str, value) -> None:
    if value not in (None, "auto", "none"):
        check_int(name, value, minimum=1)


def _ckpt_path(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a checkpoint path, 'last' or null, got {value!r}")


def _max_steps(name: str, value) -> None:
    if check_int(name, value) != -1:
        check_int(name, value, minimum=1)


_MISSING = object()

# setting -> check(name, value); a setting that the config does not have is not checked.
SETTINGS = {
    "seed": check_int,
    "global_batch_size": partial(check_int, minimum=1, optional=True),
    "ckpt_path": _ckpt_path,
    "cpu_threads": _cpu_threads,
    "matmul_precision": partial(check_choice, choices=(None, "highest", "high", "medium")),
    "save_final_checkpoint": check_bool,
    "overwrite_run_folder": check_bool,
    "trainer.max_steps": _max_steps,
    "trainer.log_every_n_steps": partial(check_int, minimum=1),
    "data.batch_size": partial(check_int, minimum=1),
    "data.seq_len": partial(check_int, minimum=1),
    "data.source.val_fraction": partial(
        check_float, low=0, high=1, low_open=True, high_open=True, optional=True
    ),
    "callbacks.last_checkpoint.every_n_train_steps": partial(check_int, minimum=1),
    "sample.max_new_tokens": partial(check_int, minimum=0),
    "sample.temperature": partial(check_float, low=0),
    "sample.top_k": partial(check_int, minimum=0),
}


def check_settings(cfg: DictConfig) -> None:
    """Raise for the first setting of :data:`SETTINGS` whose value is of the wrong kind or
    out of range."""
    for key, check in SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING:
            check(key, value)
