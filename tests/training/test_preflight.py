"""train(cfg) checks the accelerator, the model's family and its positions before any data is
downloaded or tokenized: each case runs train() with data work refused."""

from __future__ import annotations

import json

import pytest
import torch
from training_testing import compose_config

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from training.data.datamodule import GPTDataModule
from training.preflight import check_before_data
from training.train import train


@pytest.fixture
def no_data_work(monkeypatch):
    """GPTDataModule.build (tokenizer, dataset download, token cache) fails the test."""

    def refuse(self):
        raise AssertionError("data work started before the checks")

    monkeypatch.setattr(GPTDataModule, "build", refuse)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def _config(tmp_path, *overrides):
    return compose_config(
        [
            *overrides,
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )


def test_gpu_experiment_without_a_gpu_fails_first(tmp_path, no_gpu, no_data_work):
    with pytest.raises(RuntimeError, match=r"trainer.accelerator=gpu .*0 GPU.*trainer=cpu"):
        train(_config(tmp_path, "experiment=gpt2"))
    check_before_data(_config(tmp_path, "experiment=gpt2", "trainer=cpu"))  # the advice works


UNSUPPORTED = ["Qwen2ForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM"]


@pytest.mark.parametrize("architecture", UNSUPPORTED)
def test_unsupported_family_fails_first_and_points_to_transformers(
    architecture, tmp_path, no_data_work
):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    cfg = _config(tmp_path, "experiment=finetune", f"model.pretrained={folder}")
    with pytest.raises(ValueError) as info:
        train(cfg)
    message = str(info.value)
    assert f"model.pretrained={folder}" in message and architecture in message
    assert 'attn_implementation="flash_attn_triton"' in message and "apply_fused_ops" in message


def test_seq_len_beyond_a_checkpoints_positions_fails_first(tmp_path, no_data_work):
    folder = tmp_path / "gpt2-tiny"
    config = GPTConfig(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    GPTLMHeadModel(config).save_pretrained(folder)
    cfg = _config(tmp_path, "experiment=finetune", f"model.pretrained={folder}")
    with pytest.raises(ValueError, match=r"data.seq_len=1024 .* 16 positions .*model.pretrained="):
        train(cfg)
    check_before_data(
        _config(tmp_path, "experiment=finetune", f"model.pretrained={folder}", "data.seq_len=16")
    )


def test_seq_len_beyond_configured_positions_fails_first(tmp_path, no_data_work):
    cfg = _config(tmp_path, "model.config.n_positions=64")  # the quickstart: data.seq_len=128
    with pytest.raises(ValueError, match=r"data.seq_len=128 .*64 positions.*model.config.n_pos"):
        train(cfg)


def test_rotary_models_have_no_position_limit(tmp_path):
    check_before_data(_config(tmp_path, "experiment=gpt3-125m-8k", "trainer=cpu"))


def test_mistyped_checkpoint_folder_fails_first(tmp_path, no_data_work):
    cfg = _config(tmp_path, "experiment=finetune", "model.pretrained=./no_such_model")
    with pytest.raises(FileNotFoundError, match=r"model.pretrained=./no_such_model: no check"):
        train(cfg)
