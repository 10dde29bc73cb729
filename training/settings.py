"""The train.py settings, checked before anything is built: a TypeError or ValueError naming
the setting (``data.batch_size=0`` fails here, not as a division by zero minutes later).

The model, optimizer and scheduler groups of ``configs/`` become typed settings
(:class:`ModelSettings`, :class:`OptimizerSettings`, :class:`SchedulerSettings`), each made
by ``from_config`` from the composed group and each with a ``build()`` of what it describes.
The other settings are checked where they are read, from :data:`SETTINGS`. The model's sizes
are checked by GPTConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from flash_attn.utils.checks import check_bool, check_choice, check_float, check_int
from training.optim import DECAYS, lr_lambda, param_groups


class ConfigGroup:
    """A config group as a dataclass: ``GROUP`` is its name in the composed config."""

    GROUP: ClassVar[str]

    @classmethod
    def from_config(cls, node):
        """The settings of a composed group (a DictConfig or a dict); a key that is not a
        field is a ValueError naming it and the group's keys."""
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(node) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.GROUP}.{unknown[0]} is not a setting; the keys of {cls.GROUP} are "
                f"{', '.join(names)}"
            )
        return cls(**node)

    def to_dict(self) -> dict:
        """The fields as plain values (lists for tuples), as checkpoints and loggers store
        them."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }


def _optional_str(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string or null, got {value!r}")


@dataclass(frozen=True)
class ModelSettings(ConfigGroup):
    """``configs/model/*.yaml``: a GPT from a preset and field overrides, or from a Hugging
    Face checkpoint.

    Args:
        preset: a name of ``GPTConfig.from_preset`` (None: GPTConfig's defaults).
        config: GPTConfig fields; None values are left unset. With ``pretrained``, overrides
            of the checkpoint's config (fused flags, dropout).
        pretrained: a hub id or local folder to load instead of a preset.
        compile: wrap the model's forward in ``torch.compile`` (done by the LightningModule).
    """

    GROUP: ClassVar[str] = "model"
    preset: str | None = None
    config: dict = field(default_factory=dict)
    pretrained: str | None = None
    compile: bool = False

    def __post_init__(self):
        _optional_str("model.preset", self.preset)
        _optional_str("model.pretrained", self.pretrained)
        if self.config is None:
            object.__setattr__(self, "config", {})
        if not isinstance(self.config, dict):
            raise TypeError(
                f"model.config must be a mapping of GPTConfig fields, got {self.config!r}"
            )
        check_bool("model.compile", self.compile)

    def build(self, vocab_size: int | None = None) -> GPTLMHeadModel:
        """The GPTLMHeadModel (not compiled). vocab_size: the tokenizer's, used when
        ``config`` does not set one."""
        fields = {k: v for k, v in self.config.items() if v is not None}
        if self.pretrained:
            return GPTLMHeadModel.from_pretrained(str(self.pretrained), **fields)
        if "vocab_size" not in fields:
            if vocab_size is None:
                raise ValueError("model.config.vocab_size is unset and no tokenizer gave one")
            fields["vocab_size"] = vocab_size
        if self.preset:
            return GPTLMHeadModel(GPTConfig.from_preset(self.preset, **fields))
        return GPTLMHeadModel(GPTConfig(**fields))


@dataclass(frozen=True)
class OptimizerSettings(ConfigGroup):
    """``configs/optimizer/adamw.yaml`` (the same defaults): AdamW over
    :func:`training.optim.param_groups`, so biases, norm weights and embeddings do not decay.

    Args:
        lr: the peak learning rate (the schedule multiplies it).
        weight_decay: of the matrices.
        betas: AdamW's two moment decays, each in [0, 1).
        eps: added to the second moment's square root.
        fused: torch's fused AdamW (None: fused on CUDA).
    """

    GROUP: ClassVar[str] = "optimizer"
    lr: float = 3.0e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    fused: bool | None = None

    def __post_init__(self):
        check_float("optimizer.lr", self.lr, low=0, low_open=True)
        check_float("optimizer.weight_decay", self.weight_decay, low=0)
        if isinstance(self.betas, (str, bytes)) or len(list(self.betas)) != 2:
            raise TypeError(f"optimizer.betas must be two numbers, got {self.betas!r}")
        betas = tuple(
            check_float(f"optimizer.betas[{i}]", beta, low=0, high=1, high_open=True)
            for i, beta in enumerate(self.betas)
        )
        object.__setattr__(self, "betas", betas)
        check_float("optimizer.eps", self.eps, low=0)
        if self.fused is not None:
            check_bool("optimizer.fused", self.fused)

    def build(self, model: nn.Module) -> torch.optim.AdamW:
        """AdamW over the model's two parameter groups."""
        on_cuda = next(model.parameters()).is_cuda
        kwargs = {"fused": True} if (self.fused is None and on_cuda) or self.fused else {}
        return torch.optim.AdamW(
            param_groups(model, self.weight_decay),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            **kwargs,
        )


@dataclass(frozen=True)
class SchedulerSettings(ConfigGroup):
    """``configs/scheduler/cosine.yaml`` (the same defaults): a per-step multiplier of
    optimizer.lr, :func:`training.optim.lr_lambda`.

    Args:
        decay: "cosine", "linear" or "constant" after the warmup.
        warmup_steps: optimizer steps of linear warmup.
        warmup_fraction: in (0, 1): the warmup as a fraction of total_steps, overriding
            warmup_steps (None or 0: warmup_steps).
        min_lr_ratio: the multiplier reached at total_steps and held after.
        total_steps: where the decay ends (None: the run's trainer.max_steps).
    """

    GROUP: ClassVar[str] = "scheduler"
    decay: str = "cosine"
    warmup_steps: int = 20
    warmup_fraction: float | None = None
    min_lr_ratio: float = 0.1
    total_steps: int | None = None

    def __post_init__(self):
        check_choice("scheduler.decay", self.decay, DECAYS)
        check_int("scheduler.warmup_steps", self.warmup_steps, minimum=0)
        check_float(
            "scheduler.warmup_fraction",
            self.warmup_fraction,
            low=0,
            high=1,
            high_open=True,
            optional=True,
        )
        check_float("scheduler.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_int("scheduler.total_steps", self.total_steps, minimum=1, optional=True)

    def decay_steps(self, max_steps: int) -> int:
        """The optimizer step where the decay ends: total_steps, else the run's max_steps."""
        return self.total_steps or max_steps

    def warmup_length(self, max_steps: int) -> int:
        """Optimizer steps of the warmup: warmup_fraction of the decay's steps when it is in
        (0, 1), else warmup_steps."""
        if self.warmup_fraction:
            return int(self.warmup_fraction * self.decay_steps(max_steps))
        return self.warmup_steps

    def warmup_problem(self, max_steps: int) -> str | None:
        """What is wrong when the warmup does not end before the run's last step (max_steps),
        so the learning rate never reaches optimizer.lr; None when it does."""
        warmup = self.warmup_length(max_steps)
        if warmup < max_steps:
            return None
        key, value = ("scheduler.warmup_steps", self.warmup_steps)
        if self.warmup_fraction:
            key, value = ("scheduler.warmup_fraction", self.warmup_fraction)
        peak = max_steps / (warmup + 1)  # lr_lambda at the last step, max_steps - 1
        return (
            f"{key}={value} warms the learning rate up over {warmup} optimizer steps, but "
            f"trainer.max_steps={max_steps} ends the run first: the learning rate peaks at "
            f"{peak:.0%} of optimizer.lr. Lower {key} (or raise trainer.max_steps)."
        )

    def build(
        self, optimizer: torch.optim.Optimizer, max_steps: int
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """The per-step LambdaLR of a run of max_steps optimizer steps."""
        total, warmup = self.decay_steps(max_steps), self.warmup_length(max_steps)
        decay, min_lr_ratio = self.decay, float(self.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, warmup, total, decay, min_lr_ratio)
        )


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
GROUPS = (ModelSettings, OptimizerSettings, SchedulerSettings)


def check_settings(cfg: DictConfig) -> None:
    """Raise for the first setting of :data:`SETTINGS` whose value is of the wrong kind or
    out of range, then for the first bad value of the model, optimizer and scheduler groups."""
    for key, check in SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING:
            check(key, value)
    for group in GROUPS:
        node = OmegaConf.select(cfg, group.GROUP, default=None)
        if node is not None:
            group.from_config(node)
