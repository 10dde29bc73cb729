"""Every experiment composes and its pieces instantiate (no data is built, nothing runs)."""

from __future__ import annotations

import hydra
import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from training_testing import CONFIG_DIR, EXPERIMENTS, compose_config

from flash_attn.models.gpt import GPTConfig
from training.train import build_module

REQUIRED = {
    "quickstart",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "gpt3-125m",
    "gpt3-350m",
    "gpt3-760m",
    "gpt3-1.3b",
    "gpt3-2.7b",
    "gpt3-125m-rotary",
    "gpt3-125m-8k",
    "gpt3-1.3b-rotary",
    "gpt3-1.3b-8k",
    "finetune",
}


def test_required_experiments_exist():
    assert set(EXPERIMENTS) >= REQUIRED


def test_experiment_files_hold_only_overrides():
    for path in (CONFIG_DIR / "experiment").rglob("*.yaml"):  # shared bases included
        assert path.read_text().startswith("# @package _global_"), path.name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path):
    cfg = compose_config([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.task_name == name
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.seq_len == cfg.data.seq_len
    if cfg.model.pretrained:
        assert name == "finetune" and cfg.data.tokenizer.name == cfg.model.pretrained
        return
    # the experiment's architecture, at its real size, as a config (no weights allocated)
    fields = {k: v for k, v in cfg.model.config.items() if v is not None}
    fields.setdefault("vocab_size", 50257)
    if cfg.model.preset is None:
        GPTConfig(**fields)
        return
    arch = GPTConfig.from_preset(cfg.model.preset, **fields)
    assert arch.n_positions == 0 or arch.n_positions >= cfg.data.seq_len
    if "rotary" in name or "8k" in name:
        assert arch.rotary_emb_dim > 0 and arch.max_seqlen is None
    if "8k" in name:
        assert cfg.data.seq_len == 8192
    # tokens per optimizer step of the GPT-2/3 recipes: 0.5M or 1M
    assert cfg.global_batch_size * cfg.data.seq_len in (2**19, 2**20)


@pytest.mark.parametrize("name", ["quickstart", "gpt2", "gpt3-1.3b-8k"])
def test_module_and_trainer_instantiate_tiny(name, tmp_path):
    cfg = compose_config([f"experiment={name}", "debug=tiny", f"paths.output_dir={tmp_path}"])
    module = build_module(cfg, vocab_size=300)
    assert module.model.config.n_layer == 2 and module.model.config.vocab_size == 300
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.max_steps == 2


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "fsdp"])
def test_trainer_groups_compose(trainer, tmp_path):
    cfg = compose_config([f"trainer={trainer}", f"paths.output_dir={tmp_path}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.use_distributed_sampler is False  # the datamodule shards itself
    strategy = cfg.trainer.strategy
    if trainer in ("ddp", "fsdp"):
        built = hydra.utils.instantiate(strategy)  # the strategy object, before any launch
        assert isinstance(built, {"ddp": DDPStrategy, "fsdp": FSDPStrategy}[trainer])


@pytest.mark.parametrize("group", ["logger=wandb", "logger=none", "scheduler=linear", "debug=fast"])
def test_other_groups_compose(group, tmp_path):
    cfg = compose_config([group, f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
