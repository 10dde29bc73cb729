"""Bad generate / sample arguments: a TypeError or ValueError that names the argument."""

from __future__ import annotations

import pytest
import torch

from flash_attn.models.generation import sample
from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from tests.bad_inputs.bad_inputs_testing import assert_rejected


@pytest.fixture(scope="module")
def model() -> GPTLMHeadModel:
    return GPTLMHeadModel(GPTConfig(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2))


_PROMPT = torch.zeros(2, 3, dtype=torch.long)

GENERATE_CASES = [
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(eos_token_id=61), ValueError, "eos_token_id"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(input_ids=_PROMPT.float()), TypeError, "input_ids"),
    (dict(input_ids=torch.zeros(3, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids"),
]


@pytest.mark.parametrize("arguments, error, name", GENERATE_CASES)
def test_generate_rejects(model, arguments, error, name):
    arguments = {"input_ids": _PROMPT, "max_new_tokens": 2, **arguments}
    assert_rejected(lambda: model.generate(**arguments), error, name)


@pytest.mark.parametrize(
    "arguments, error, name",
    [
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(top_k=-3), ValueError, "top_k"),
    ],
)
def test_sample_rejects(arguments, error, name):
    assert_rejected(lambda: sample(torch.zeros(2, 5), **arguments), error, name)
