"""Bad GPTConfig fields and GPTLMHeadModel.forward inputs: a TypeError or ValueError that
names the argument."""

from __future__ import annotations

import pytest
import torch

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from tests.bad_inputs.bad_inputs_testing import assert_rejected

TINY = dict(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2)

CONFIG_CASES = [
    (dict(n_head_kv=0), ValueError, "n_head_kv"),
    (dict(n_head_kv=3), ValueError, "n_head_kv"),
    (dict(n_head=0), ValueError, "n_head"),
    (dict(n_layer="2"), TypeError, "n_layer"),
    (dict(n_layer=0), ValueError, "n_layer"),
    (dict(vocab_size=64.5), TypeError, "vocab_size"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(n_embd=15), ValueError, "n_embd"),
    (dict(n_embd=None), TypeError, "n_embd"),
    (dict(n_positions=-1), ValueError, "n_positions"),
    (dict(n_inner=0), ValueError, "n_inner"),
    (dict(sliding_window=0), ValueError, "sliding_window"),
    (dict(sliding_window=2.5), TypeError, "sliding_window"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(norm_type="batchnorm"), ValueError, "norm_type"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(layer_norm_epsilon=0.0), ValueError, "layer_norm_epsilon"),
    (dict(rotary_emb_fraction=1.5), ValueError, "rotary_emb_fraction"),
    (dict(rotary_emb_base=-1.0), ValueError, "rotary_emb_base"),
    (dict(rotary_emb_scaling="linear"), TypeError, "rotary_emb_scaling"),
    (dict(attn_pdrop=1.0), ValueError, "attn_pdrop"),
    (dict(resid_pdrop=float("nan")), ValueError, "resid_pdrop"),
    (dict(embd_pdrop="0.1"), TypeError, "embd_pdrop"),
    (dict(fused_mlp="no"), TypeError, "fused_mlp"),
    (dict(tie_word_embeddings=None), TypeError, "tie_word_embeddings"),
    (dict(pad_vocab_size_multiple=0), ValueError, "pad_vocab_size_multiple"),
    (dict(initializer_range=-0.02), ValueError, "initializer_range"),
]


@pytest.mark.parametrize("fields, error, name", CONFIG_CASES)
def test_gpt_config_rejects(fields, error, name):
    assert_rejected(lambda: GPTConfig(**{**TINY, **fields}), error, name)


@pytest.fixture(scope="module")
def model() -> GPTLMHeadModel:
    return GPTLMHeadModel(GPTConfig(**TINY)).eval()


_IDS = torch.zeros(2, 4, dtype=torch.long)

FORWARD_CASES = [
    (dict(input_ids=_IDS.float()), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(4, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=_IDS + 61), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids must hold"),
    (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), ValueError, "input_ids must hold"),
    (dict(position_ids=torch.tensor([0, 1, 2, 16])), ValueError, "position_ids"),
    (dict(position_ids=torch.tensor([-1, 0, 1, 2])), ValueError, "position_ids"),
    (dict(position_ids=torch.arange(5)), ValueError, "position_ids"),
    (dict(position_ids=torch.arange(4.0)), TypeError, "position_ids"),
    (dict(attention_mask=torch.zeros(2, 4)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])), ValueError, "attention_mask"),
    (dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask"),
    (dict(attention_mask=[[1, 1, 1, 1]] * 2), TypeError, "attention_mask"),
    (dict(num_last_tokens=-1), ValueError, "num_last_tokens"),
    (dict(num_last_tokens=1.5), TypeError, "num_last_tokens"),
    (dict(labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, "labels"),
    (dict(input_ids=torch.zeros(1, 17, dtype=torch.long)), ValueError, "n_positions"),
]


@pytest.mark.parametrize("inputs, error, name", FORWARD_CASES)
def test_forward_rejects(model, inputs, error, name):
    assert_rejected(lambda: model(**{"input_ids": _IDS, **inputs}), error, name)
