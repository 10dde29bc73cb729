"""Bad from_pretrained folders: a missing folder, a config.json that is not JSON, damaged
weight files, shard names outside the folder. Each error names the file or argument."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from tests.bad_inputs.bad_inputs_testing import assert_rejected


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint folder written by save_pretrained."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    config = GPTConfig(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    GPTLMHeadModel(config).save_pretrained(folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    return folder


def _truncate_weights(folder: Path) -> str:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return str(weights)


def _config_not_json(folder: Path) -> str:
    (folder / "config.json").write_text("{not json")
    return str(folder / "config.json")


def _config_a_list(folder: Path) -> str:
    (folder / "config.json").write_text("[1, 2]")
    return str(folder / "config.json")


def _shard_outside(folder: Path) -> str:
    outside = folder.parent / "x"
    outside.mkdir()
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../x/model.safetensors"}}))
    return str(index)


def _shard_absolute(folder: Path) -> str:
    index = folder / "model.safetensors.index.json"
    target = str(folder.parent / "elsewhere.safetensors")
    (folder / "model.safetensors").rename(index.with_name("shard.safetensors"))
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": target}}))
    return str(index)


def _index_without_map(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    return str(index)


def _shard_missing(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "part-1.safetensors"}}))
    return str(folder / "part-1.safetensors")


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return str(folder)


def _no_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return str(folder)


def _bin_not_a_checkpoint(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    return str(folder / "pytorch_model.bin")


FOLDER_CASES = [
    (_truncate_weights, ValueError),
    (_config_not_json, ValueError),
    (_config_a_list, ValueError),
    (_shard_outside, ValueError),
    (_shard_absolute, ValueError),
    (_index_without_map, ValueError),
    (_shard_missing, FileNotFoundError),
    (_no_weights, FileNotFoundError),
    (_no_config, FileNotFoundError),
    (_bin_not_a_checkpoint, ValueError),
]


@pytest.mark.parametrize("damage, error", FOLDER_CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_from_pretrained_names_the_bad_file(damage, error, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    named = damage(folder)
    assert_rejected(lambda: GPTLMHeadModel.from_pretrained(folder), error, named)


@pytest.mark.parametrize(
    "name_or_path, error, name",
    [
        ("/no/such/checkpoint", FileNotFoundError, "/no/such/checkpoint"),
        ("./missing-folder", FileNotFoundError, "./missing-folder"),
        ("runs/exp/export", FileNotFoundError, "runs/exp/export"),
        (42, TypeError, "name_or_path"),
    ],
)
def test_from_pretrained_rejects_missing_folders(name_or_path, error, name):
    assert_rejected(lambda: GPTLMHeadModel.from_pretrained(name_or_path), error, name)


def test_from_pretrained_rejects_a_size_override(saved):
    assert_rejected(lambda: GPTLMHeadModel.from_pretrained(saved, n_layer=3), ValueError, "n_layer")


def _offline(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_missing_folder_shaped_like_a_hub_id_is_named(tmp_path, monkeypatch):
    """'no_such_dir/model' may be a hub id: when the hub does not give it, the error says that
    no folder is there either; 'runs/typo' whose 'runs' is a folder here is a path."""
    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        GPTLMHeadModel.from_pretrained("no_such_dir/model")
    assert "neither a local folder" in str(info.value)
    assert f"nothing at {tmp_path / 'no_such_dir' / 'model'}" in str(info.value)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at .*runs/typo"):
        GPTLMHeadModel.from_pretrained("runs/typo")


@pytest.mark.parametrize(
    "name, path",
    [
        ("gpt2", False),
        ("EleutherAI/pythia-70m", False),
        ("Qwen/Qwen2.5-0.5B", False),
        ("/abs/folder", True),
        ("./folder", True),
        ("../folder", True),
        ("~/models/x", True),
        ("a/b/c", True),
        ("C:\\models\\x", True),
        ("my model", True),
        (".hidden", True),
    ],
)
def test_looks_like_path(name, path):
    from flash_attn.models.hf_checkpoint import looks_like_path

    assert looks_like_path(name) is path
