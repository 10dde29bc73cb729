"""Optimizer groups, schedule, FLOP count, atomic checkpoint files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from training.checkpointing import VerifiedCheckpointIO
from training.lightning_module import GPTLightningModule, flops_per_token
from training.optim import lr_lambda, param_groups
from training.settings import ModelSettings, SchedulerSettings

TINY = dict(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)


def _tiny_model() -> GPTLMHeadModel:
    return GPTLMHeadModel(GPTConfig(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def test_no_weight_decay_for_biases_norms_and_embeddings():
    model = _tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & kept
    assert len(decayed) + len(kept) == len(names)
    for name in decayed:
        assert "emb" not in name and not name.endswith("bias") and "ln" not in name, name
    assert any("wte" in n for n in kept) and any("wpe" in n for n in kept)
    assert any(n.endswith("bias") for n in kept) and any("ln_f" in n for n in kept)
    assert any("mlp" in n for n in decayed) and any("attn" in n for n in decayed)


def test_schedule_warmup_then_decay():
    warmup, total = 10, 110
    cos = [lr_lambda(s, warmup, total, "cosine", 0.1) for s in range(total + 5)]
    lin = [lr_lambda(s, warmup, total, "linear", 0.0) for s in range(total + 5)]
    assert cos[0] == pytest.approx(1 / 11) and cos[warmup - 1] == pytest.approx(10 / 11)
    assert cos[warmup] == 1.0 and lin[warmup] == 1.0
    assert all(a > b for a, b in zip(cos[warmup:total], cos[warmup + 1 : total + 1]))
    assert cos[total] == pytest.approx(0.1) and cos[-1] == pytest.approx(0.1)
    assert cos[warmup + 50] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos = 0
    assert lin[warmup + 25] == pytest.approx(0.75) and lin[total] == pytest.approx(0.0)
    assert lr_lambda(500, 10, 110, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="scheduler.decay"):
        lr_lambda(0, 1, 2, "step", 0.1)


@pytest.mark.parametrize(
    "warmup, key",
    [
        (dict(warmup_steps=10), "scheduler.warmup_steps=10"),
        (dict(warmup_fraction=0.5), "scheduler.warmup_fraction=0.5"),
    ],
)
def test_warmup_longer_than_the_run_is_named(warmup, key, caplog):
    module = GPTLightningModule(
        model=ModelSettings(config=TINY),
        scheduler=SchedulerSettings(**{"warmup_steps": 0, "total_steps": 20, **warmup}),
    )
    module.optimizer_and_scheduler(max_steps=4)
    peak = 4 / 11  # the lr at the last of 4 steps of a 10-step warmup
    assert f"{key} warms the learning rate up over 10 optimizer steps" in caplog.text
    assert f"trainer.max_steps=4 ends the run first: the learning rate peaks at {peak:.0%}" in (
        caplog.text
    )
    caplog.clear()
    module.optimizer_and_scheduler(max_steps=11)  # warmup ends within the run
    assert "warms the learning rate up" not in caplog.text


def test_flops_per_token_counts_matmuls():
    cfg = GPTConfig(vocab_size=1000, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    model = GPTLMHeadModel(cfg)
    n = model.num_parameters(exclude_embeddings=True)
    # hand count of the matmul weights: per layer qkv 3E^2 + out E^2 + mlp 8E^2, plus lm_head
    matmul_weights = cfg.n_layer * 12 * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd
    expected = 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_embd * 64
    got = flops_per_token(cfg, n, 64)
    assert got >= expected and got / expected < 1.03  # biases and norms add a little


def test_atomic_checkpoint_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    io = VerifiedCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4)}, path)
    assert torch.load(path)["step"] == 1

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_the_models_with_or_without_linear_cross_entropy(reduction):
    modules = [
        GPTLightningModule(model=ModelSettings(config=TINY | {"linear_cross_entropy": fused}))
        for fused in (False, True)
    ]
    modules[1].load_state_dict(modules[0].state_dict())
    batch = torch.randint(0, 61, (3, 9))  # (B, T + 1)
    logits = modules[0](batch[:, :-1])  # (B, T, V)
    expected = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction=reduction
    )
    for module in modules:
        torch.testing.assert_close(module.loss(batch, reduction), expected)


class RecordingData:
    """The TrainingData protocol and nothing else: two bytes per token, batches recorded."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.consumed = vocab_size, []

    def token_bytes(self) -> torch.Tensor:
        return torch.full((self.vocab_size,), 2, dtype=torch.int64)

    def on_train_batch_consumed(self, local_samples: int, batch) -> None:
        self.consumed.append((local_samples, batch.shape))


def test_the_module_uses_its_data_through_the_protocol(tmp_path):
    """The module reaches its data only through the object it was given (not the Trainer's
    datamodule, here absent): every training batch is reported, and bits per byte read the
    data's bytes per token."""
    import lightning as L
    from torch.utils.data import DataLoader

    data = RecordingData(TINY["vocab_size"])
    module = GPTLightningModule(model=ModelSettings(config=TINY), data=data)
    windows = list(torch.randint(0, 61, (8, 9)))  # (T + 1,) each
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=4)  # one epoch
    trainer.fit(module, DataLoader(windows, batch_size=2), DataLoader(windows, batch_size=2))
    assert data.consumed == [(2, (2, 9))] * 4
    metrics = trainer.callback_metrics
    assert float(metrics["val/bpb"]) == pytest.approx(
        float(metrics["val/loss"]) / (2 * math.log(2)), rel=1e-5
    )


def test_the_datamodule_is_training_data(tmp_path):
    from training.data.datamodule import GPTDataModule
    from training.lightning_module import TrainingData

    source = {"kind": "files", "data_files": str(tmp_path / "none.txt")}
    datamodule = GPTDataModule(source, {"kind": "bytes"}, cache_dir=str(tmp_path))
    assert isinstance(datamodule, TrainingData)
    assert not isinstance(object(), TrainingData)


def test_a_vocabulary_that_is_not_the_models_is_named():
    module = GPTLightningModule(model=ModelSettings(config=TINY), data=RecordingData(60))
    with pytest.raises(ValueError, match="the tokenizer has 60 tokens but the model vocab_size"):
        module.setup("fit")
