"""GPTConfig / GPTLMHeadModel: presets, init, vocab padding, fused flags, loss, padding, errors."""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from flash_attn.modules.block import Block, ParallelBlock

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)


def _model(**overrides):
    torch.manual_seed(0)
    return GPTLMHeadModel(GPTConfig(**{**TINY, **overrides}))


# Parameter counts of the Hugging Face GPT-2 checkpoints (vocab 50257, tied head), computed
# from the architecture: 12 * L * E^2 + 13 * L * E (blocks) + (V + P) * E + 2 * E (embeddings
# and final norm).
@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-2.7b"])
def test_preset_parameter_counts(name):
    config = GPTConfig.from_preset(name, pad_vocab_size_multiple=1)
    model = GPTLMHeadModel(config, device="meta")
    L, E, V, P = config.n_layer, config.n_embd, config.vocab_size, config.n_positions
    assert model.num_parameters() == 12 * L * E * E + 13 * L * E + (V + P) * E + 2 * E
    assert model.num_parameters(exclude_embeddings=True) == 12 * L * E * E + 13 * L * E + 2 * E


def test_presets_listed_and_unknown():
    assert GPTConfig.presets()[:4] == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert GPTConfig.from_preset("gpt3-1.3b").n_positions == 2048
    assert (
        abs(GPTLMHeadModel(GPTConfig.from_preset("gpt2"), device="meta").num_parameters() - 124e6)
        < 1e6
    )
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*gpt2-medium"):
        GPTConfig.from_preset("gpt5")


def test_config_errors():
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_embd=65, n_head=4)
    with pytest.raises(ValueError, match="n_head_kv"):
        GPTConfig(n_head=12, n_head_kv=5)
    with pytest.raises(ValueError, match="norm_type"):
        GPTConfig(norm_type="batchnorm")
    with pytest.raises(TypeError, match="GPTConfig"):
        GPTLMHeadModel({"n_layer": 2})


def test_gpt2_init_and_tied_vocab_padding():
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        pad_vocab_size_multiple=128,
    )
    model = GPTLMHeadModel(config)
    assert model.transformer.embeddings.wte.weight.shape == (1024, 256)
    assert model.lm_head.weight is model.transformer.embeddings.wte.weight
    block = model.transformer.h[0]
    assert abs(block.attn.Wqkv.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    for w in (block.attn.out_proj.weight, block.mlp.fc2.weight):
        assert abs(w.std().item() - scaled) < 0.1 * scaled
    assert torch.all(block.attn.Wqkv.bias == 0)
    out = model(torch.randint(0, 1000, (2, 5)))
    assert out.logits.shape == (2, 5, 1000) and out.loss is None


def test_loss_is_shifted_cross_entropy():
    model = _model(fused_cross_entropy=False)
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


def test_linear_cross_entropy_loss_and_grads_match():
    ids = torch.randint(0, 97, (2, 9))
    plain, fused = _model(), _model(linear_cross_entropy=True)
    out_plain, out_fused = plain(ids, labels=ids), fused(ids, labels=ids)
    assert out_fused.logits is None
    torch.testing.assert_close(out_fused.loss, out_plain.loss, atol=1e-6, rtol=1e-6)
    out_plain.loss.backward()
    out_fused.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("linear_ce", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_aligned_labels_equal_shifted_labels(linear_ce, reduction):
    """A training window w: inputs w[:, :-1] with aligned targets w[:, 1:] give the loss that
    the whole window gives with the labels shifted inside."""
    model = _model(linear_cross_entropy=linear_ce)
    window = torch.randint(0, 97, (2, 10))
    labels = window.clone()
    labels[0, 3] = -100
    shifted = model(window, labels=labels, reduction=reduction).loss
    aligned = model(window[:, :-1], labels=labels[:, 1:], shift_labels=False, reduction=reduction)
    expected_shape = (2, 9) if reduction == "none" else ()
    assert shifted.shape == aligned.loss.shape == expected_shape
    torch.testing.assert_close(aligned.loss, shifted, atol=1e-6, rtol=1e-6)


UNFUSED = dict(
    fused_dropout_add_ln=False, fused_mlp=False, fused_cross_entropy=False, fused_rotary=False
)


@pytest.mark.parametrize(
    "arch",
    [
        dict(),
        dict(rotary_emb_fraction=0.5, n_head_kv=2, parallel_block=True),
        dict(norm_type="rmsnorm", gated_mlp=True, activation="silu", rotary_emb_fraction=1.0),
    ],
)
def test_fused_triton_equals_unfused_torch(arch):
    """Every fused op on through the Triton kernels (interpreter) vs plain PyTorch: logits,
    loss and gradients."""
    pytest.importorskip("triton")
    ids = torch.randint(0, 97, (1, 8))
    fused = _model(backend="triton", **arch)
    plain = _model(backend="torch", **UNFUSED, **arch)
    out_f, out_p = fused(ids, labels=ids), plain(ids, labels=ids)
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_f.loss, out_p.loss, atol=1e-5, rtol=0)
    out_f.loss.backward()
    out_p.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_attention_mask_right_padding():
    model = _model(rotary_emb_fraction=1.0, n_positions=0).eval()
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :4]).logits
    torch.testing.assert_close(padded[1:, :4], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:1], model(ids[:1]).logits, atol=1e-5, rtol=0)


def test_half_precision_residual_in_fp32():
    model = _model(residual_in_fp32=True).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    block = model.transformer.h[0]
    assert isinstance(block, Block)
    out, residual = block(hidden)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    logits = model(torch.randint(0, 97, (2, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_parallel_block_matches_formula():
    model = _model(parallel_block=True, rotary_emb_fraction=0.5, n_positions=0).eval()
    block = model.transformer.h[0]
    assert isinstance(block, ParallelBlock)
    x = torch.randn(2, 5, 64)
    ln = torch.nn.functional.layer_norm
    with torch.no_grad():
        a, m, residual = block(x)
        expected = (
            x
            + block.attn(ln(x, (64,), block.ln_1.weight, block.ln_1.bias))
            + block.mlp(ln(x, (64,), block.ln_2.weight, block.ln_2.bias))
        )
    torch.testing.assert_close(a + m + residual, expected, atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    model = _model(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    ids = torch.randint(0, 97, (1, 6))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_forward_errors():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, 97, (6,)))
    with pytest.raises(ValueError, match="n_positions=32"):
        model(torch.randint(0, 97, (1, 33)))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randint(0, 97, (1, 5)), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 97\), got \[0, 100\]"):
        model(torch.tensor([[0, 100, 5]]))


def test_training_with_fused_ops_follows_the_plain_model_step_by_step():
    """Convergence: the same tiny model trained 8 AdamW steps with every fused op on (Triton
    interpreter) and off (plain PyTorch) sees the same losses at every step. One block runs
    every fused op (the interpreter's cost is per kernel launch: each block adds launches, not
    paths); test_fused_triton_equals_unfused_torch covers two blocks."""
    pytest.importorskip("triton")
    arch = dict(rotary_emb_fraction=0.5, n_head_kv=2, n_layer=1)
    fused = _model(backend="triton", **arch)
    plain = _model(backend="torch", **UNFUSED, **arch)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (fused, plain)]
    generator = torch.Generator().manual_seed(1)
    losses = {"fused": [], "plain": []}
    for _ in range(8):
        ids = torch.randint(0, 97, (2, 16), generator=generator)
        for name, model, optimizer in zip(losses, (fused, plain), optimizers):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["plain"][-1] < losses["plain"][0]  # it does learn
    torch.testing.assert_close(
        torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=1e-5
    )
