"""Document masking: packed documents behave as if each were run alone."""

from __future__ import annotations

import pytest
import torch
from training_testing import make_documents, write_corpus

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel, document_layout
from training.data.datamodule import GPTDataModule
from training.data.packing import document_starts
from training.lightning_module import GPTLightningModule
from training.settings import ModelSettings

LENGTHS = (5, 9, 4)  # three documents in one window of 18 tokens


def _model(rotary: bool) -> GPTLMHeadModel:
    torch.manual_seed(0)
    extra = {"rotary_emb_fraction": 0.5, "n_positions": 0} if rotary else {"n_positions": 32}
    config = GPTConfig(vocab_size=50, n_embd=32, n_layer=2, n_head=4, **extra)
    return GPTLMHeadModel(config).eval()


def _packed() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 18) tokens of three documents and their (1, 18) document starts."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (1, sum(LENGTHS)), generator=generator)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[0, torch.tensor([0, *LENGTHS[:-1]]).cumsum(0)] = True
    return tokens, starts


def test_document_layout_restarts_positions():
    starts = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    cu_seqlens, max_seqlen, positions = document_layout(starts)
    assert cu_seqlens.tolist() == [0, 3, 5, 7, 10] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3
    assert positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]


@pytest.mark.parametrize("rotary", [False, True], ids=["learned", "rotary"])
def test_packed_documents_match_documents_run_alone(rotary):
    model = _model(rotary)
    tokens, starts = _packed()
    packed = model(tokens, labels=tokens, document_starts=starts, reduction="sum")
    packed.loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone_loss = 0.0
    for doc, logits in zip(tokens.split(LENGTHS, dim=1), packed.logits.split(LENGTHS, dim=1)):
        alone = model(doc, labels=doc, reduction="sum")
        torch.testing.assert_close(logits, alone.logits, atol=1e-5, rtol=1e-5)
        alone.loss.backward()
        alone_loss = alone_loss + alone.loss.detach()
    # the first token of a document is never a target: the losses and gradients add up
    torch.testing.assert_close(packed.loss.detach(), alone_loss, atol=1e-4, rtol=1e-5)
    for packed_grad, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, p.grad, atol=1e-5, rtol=1e-4)


def test_without_document_starts_documents_see_each_other():
    model = _model(rotary=False)
    tokens, starts = _packed()
    plain = model(tokens).logits
    one_document = model(tokens, document_starts=torch.zeros_like(starts)).logits
    torch.testing.assert_close(plain, one_document, atol=1e-5, rtol=1e-5)
    packed = model(tokens, document_starts=starts).logits
    assert not torch.allclose(plain[:, LENGTHS[0] :], packed[:, LENGTHS[0] :], atol=1e-3)


def test_window_document_starts_follow_end_of_text():
    windows = torch.tensor([[7, 3, 9, 3, 3, 5], [3, 1, 2, 4, 3, 6]])
    assert document_starts(windows, eos_id=3).int().tolist() == [
        [1, 0, 1, 0, 1, 1],
        [1, 1, 0, 0, 0, 1],
    ]


def _datamodule(tmp_path, document_mask: bool) -> GPTDataModule:
    paths = write_corpus(tmp_path / "data", make_documents(12), "jsonl")
    source = {"kind": "files", "data_files": str(paths[0]), "val_fraction": 0.25}
    cache = str(tmp_path / "cache")
    return GPTDataModule(
        source,
        {"kind": "bytes"},
        seq_len=256,
        batch_size=4,
        cache_dir=cache,
        document_mask=document_mask,
    )


def test_memmap_batches_carry_document_starts_only_when_asked(tmp_path):
    plain = _datamodule(tmp_path, document_mask=False)
    plain.setup("fit")
    masked = _datamodule(tmp_path, document_mask=True)
    masked.setup("fit")
    windows = next(iter(plain.train_dataloader()))
    batch = next(iter(masked.train_dataloader()))
    assert isinstance(windows, torch.Tensor) and windows.shape == (4, 257)
    torch.testing.assert_close(batch["tokens"], windows)  # same windows, boundaries added
    torch.testing.assert_close(batch["document_starts"], document_starts(windows, 256))
    assert batch["document_starts"][:, 1:].any()  # 4 x 256 bytes cross a boundary


def test_loss_never_predicts_a_documents_first_token():
    module = GPTLightningModule(
        model=ModelSettings(config={"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16}),
        vocab_size=20,
    )
    windows = torch.tensor([[1, 2, 19, 4, 5, 6, 19, 8, 9]])  # eos 19 ends two documents
    batch = {"tokens": windows, "document_starts": document_starts(windows, 19)}
    per_token = module.loss(batch, reduction="none")  # (1, 8)
    assert (per_token[0, [2, 6]] == 0).all() and (per_token[0, [0, 1, 3, 4, 5, 7]] > 0).all()
