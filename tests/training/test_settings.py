"""The typed settings of training/settings.py: composed from configs/, built into the model,
optimizer and scheduler, bad values named."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from training_testing import compose_config

from training.optim import lr_lambda
from training.settings import GROUPS, ModelSettings, OptimizerSettings, SchedulerSettings

TINY = dict(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)


@pytest.mark.parametrize("settings", [OptimizerSettings, SchedulerSettings])
def test_defaults_are_the_yaml_files(settings, tmp_path):
    """The dataclass defaults and configs/optimizer/adamw.yaml, configs/scheduler/cosine.yaml
    (the groups config.yaml picks) say the same."""
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    assert settings.from_config(cfg[settings.GROUP]) == settings()


@pytest.mark.parametrize("experiment", ["quickstart", "gpt3-125m", "finetune"])
def test_every_group_composes_into_its_settings(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    for settings in GROUPS:
        built = settings.from_config(cfg[settings.GROUP])
        assert built.to_dict().keys() == cfg[settings.GROUP].keys()
    assert OptimizerSettings.from_config(cfg.optimizer).lr == cfg.optimizer.lr


def test_optimizer_build_makes_the_two_groups():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    settings = OptimizerSettings(lr=0.5, weight_decay=0.2, betas=[0.8, 0.9], eps=1e-6)
    optimizer = settings.build(model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [(3, 4)]  # the Linear's matrix alone
    assert len(no_decay["params"]) == 4  # embedding, bias, norm weight and bias
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    for group in optimizer.param_groups:
        assert group["lr"] == 0.5 and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        assert not group["fused"]  # None: fused on CUDA only


def test_scheduler_build_follows_lr_lambda_up_to_max_steps():
    settings = SchedulerSettings(decay="linear", warmup_fraction=0.25, min_lr_ratio=0.5)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = settings.build(optimizer, max_steps=8)  # total_steps None: the run's 8 steps
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.0 * lr_lambda(s, 2, 8, "linear", 0.5) for s in range(10)])
    assert lrs[2] == 2.0 and lrs[8] == lrs[9] == 1.0  # peak after warmup, then min_lr_ratio
    later = SchedulerSettings(total_steps=100, warmup_steps=3).build(optimizer, max_steps=8)
    assert later.lr_lambdas[0](99) > later.lr_lambdas[0](100) == pytest.approx(0.1)


def test_model_build_uses_the_tokenizers_vocab_when_unset():
    model = ModelSettings(config={**TINY, "vocab_size": None}).build(vocab_size=77)
    assert model.config.vocab_size == 77 and model.config.n_layer == 2
    assert ModelSettings(config=TINY).build(vocab_size=77).config.vocab_size == 61
    preset = ModelSettings(preset="gpt2", config={"n_layer": 1}).build(vocab_size=50)
    assert (preset.config.n_embd, preset.config.n_layer) == (768, 1)
    with pytest.raises(ValueError, match="model.config.vocab_size"):
        ModelSettings(config={"n_layer": 1}).build()


def test_settings_are_saved_as_plain_hyperparameters():
    from training.lightning_module import GPTLightningModule

    module = GPTLightningModule(
        ModelSettings(config=TINY), OptimizerSettings(betas=(0.5, 0.6)), vocab_size=None
    )
    hparams = dict(module.hparams)
    assert hparams["optimizer"]["betas"] == [0.5, 0.6]  # a list: loads with weights_only
    assert hparams["scheduler"] == SchedulerSettings().to_dict()
    assert ModelSettings.from_config(hparams["model"]) == ModelSettings(config=TINY)
    # checkpoints written before ModelSettings held no "compile" in their model settings
    old = {"preset": None, "config": TINY, "pretrained": None}
    assert ModelSettings.from_config(old).build().config.vocab_size == 61


@pytest.mark.parametrize(
    "settings, values, error, name",
    [
        (OptimizerSettings, {"lr": 0.0}, ValueError, "optimizer.lr"),
        (OptimizerSettings, {"lr": "fast"}, TypeError, "optimizer.lr"),
        (OptimizerSettings, {"betas": [0.9]}, TypeError, "optimizer.betas"),
        (OptimizerSettings, {"betas": [0.9, 1.0]}, ValueError, "optimizer.betas[1]"),
        (OptimizerSettings, {"weight_decay": -0.1}, ValueError, "optimizer.weight_decay"),
        (OptimizerSettings, {"fused": "yes"}, TypeError, "optimizer.fused"),
        (SchedulerSettings, {"decay": "step"}, ValueError, "scheduler.decay"),
        (SchedulerSettings, {"warmup_steps": -1}, ValueError, "scheduler.warmup_steps"),
        (SchedulerSettings, {"warmup_fraction": 1.0}, ValueError, "scheduler.warmup_fraction"),
        (SchedulerSettings, {"min_lr_ratio": 2}, ValueError, "scheduler.min_lr_ratio"),
        (SchedulerSettings, {"total_steps": 0}, ValueError, "scheduler.total_steps"),
        (ModelSettings, {"compile": "no"}, TypeError, "model.compile"),
        (ModelSettings, {"config": [1]}, TypeError, "model.config"),
        (ModelSettings, {"preset": 3}, TypeError, "model.preset"),
    ],
)
def test_bad_values_are_named(settings, values, error, name):
    with pytest.raises(error, match="^" + re.escape(name) + " must"):
        settings.from_config(values)


def test_unknown_key_names_itself_and_the_groups_keys():
    with pytest.raises(ValueError, match=r"scheduler.warmup is not a setting.*warmup_steps"):
        SchedulerSettings.from_config({"warmup": 10})
