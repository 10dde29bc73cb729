"""KV-cache decoding: equals decoding without a cache, sampling filters, eos, errors."""

from __future__ import annotations

import pytest
import torch

from flash_attn.models.generation import InferenceParams, generate, sample
from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel


def _model(**overrides):
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=97,
        n_positions=48,
        initializer_range=0.3,
        **overrides,
    )
    return GPTLMHeadModel(config).eval()


def _greedy_without_cache(model, ids, n):
    for _ in range(n):
        next_token = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


@pytest.mark.parametrize(
    "arch", [dict(), dict(rotary_emb_fraction=1.0, n_head_kv=2, parallel_block=True)]
)
def test_cached_greedy_equals_full_recompute(arch):
    model = _model(**arch)
    prompt = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        expected = _greedy_without_cache(model, prompt, 9)
    out = generate(model, prompt, 9, top_k=1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(prompt, 9, temperature=0.0), expected)


def test_eos_stops_rows():
    model = _model()
    prompt = torch.randint(0, 97, (2, 4))
    free = generate(model, prompt, 12, top_k=1)
    eos = int(free[0, 6])  # the third generated token of row 0
    out = generate(model, prompt, 12, top_k=1, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 4:] == eos).nonzero().flatten()
        end = 4 + int(hits[0]) if len(hits) else free.shape[1]
        # Same tokens up to the first eos, only eos after it.
        assert torch.equal(out[row, :end], free[row, :end])
        assert torch.all(out[row, end:] == eos)
    # Decoding stops once every row has produced eos.
    row_ends = [(free[r, 4:] == eos).nonzero().flatten() for r in range(2)]
    if all(len(h) for h in row_ends):
        assert out.shape[1] == 4 + 1 + max(int(h[0]) for h in row_ends)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    top2 = sample(logits, top_k=2)
    assert set(top2.tolist()) == {2, 3}
    # softmax([3, 2, 1, 0, -1]) = [.64, .24, .09, .03, .01]: top_p=0.8 keeps tokens 3 and 2.
    top_p = sample(logits, top_p=0.8)
    assert set(top_p.tolist()) == {2, 3}
    frac = (top_p == 3).float().mean().item()
    assert abs(frac - 0.64 / 0.88) < 0.05
    assert torch.all(sample(logits, temperature=0.0) == 3)
    # A low temperature concentrates the samples on the argmax.
    assert (sample(logits, temperature=0.05) == 3).float().mean() > 0.99


def test_sampling_reproducible():
    model = _model()
    prompt = torch.randint(0, 97, (2, 3))
    torch.manual_seed(5)
    a = generate(model, prompt, 6, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    b = generate(model, prompt, 6, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (2, 9)


def test_inference_params_reset_keeps_cache():
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    params.key_value_memory_dict[0] = "cache"
    params.seqlen_offset = 4
    params.reset(8, 2)
    assert params.seqlen_offset == 0 and 0 in params.key_value_memory_dict
    params.reset(20, 2)
    assert not params.key_value_memory_dict


def test_generate_errors():
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, top_p=0.0)
    with pytest.raises(ValueError, match="n_positions=48"):
        generate(model, torch.zeros(1, 45, dtype=torch.long), 5)
