"""Plans per call signature (flash_attn.ops.attention.api): a later call of a signature reuses
its plan and gives what a first call gives; whatever a plan bakes in (returned probabilities,
alignment, options) is part of the signature; calls that must not be cached are not."""

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func
from flash_attn.ops.attention import api
from tests.ops.attention_testing import BACKENDS, device_and_dtypes


def _qkv(device, batch=2, seqlen=19, heads=2, dim=16):
    torch.manual_seed(0)
    return [torch.randn(batch, seqlen, heads, dim, device=device) for _ in "qkv"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signature_reuses_its_plan_with_the_same_results(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = _qkv(device)
    api._plans.clear()
    first = flash_attn_func(q, k, v, causal=True, backend=backend)
    assert len(api._plans) == 1
    (plan,) = api._plans.values()
    again = flash_attn_func(q.clone(), k.clone(), v.clone(), causal=True, backend=backend)
    assert list(api._plans.values()) == [plan]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    flash_attn_func(q, k, v, causal=False, backend=backend)  # another option: another plan
    assert len(api._plans) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_returned_probabilities_are_part_of_the_signature(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = _qkv(device)
    plain = flash_attn_func(q, k, v, backend=backend)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, backend=backend)
    assert probs is not None and probs.shape == (2, 2, 19, 19)
    # The torch backend computes returned probabilities the naive way, else with SDPA.
    exact = backend == "triton"
    torch.testing.assert_close(out, plain, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_a_misaligned_view_gets_its_own_plan():
    """Triton specialises pointers on 16-byte alignment: a view one element in must not reuse
    the plan compiled for aligned tensors."""
    device, _ = device_and_dtypes("triton")
    q, k, v = _qkv(device)
    flat = torch.randn(q.numel() + 1, device=device)
    shifted = flat[1:].view(q.shape)  # 4 bytes past an aligned address
    shifted.copy_(q)
    api._plans.clear()
    expected = flash_attn_func(q, k, v, backend="triton")
    got = flash_attn_func(shifted, k, v, backend="triton")
    assert len(api._plans) == 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_of_tensors_is_not_cached(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = _qkv(device)
    api._plans.clear()
    window = torch.tensor([4, 0])
    for _ in range(3):
        out = flash_attn_func(q, k, v, window_size=window, backend=backend)
    assert not api._plans
    expected = flash_attn_func(q, k, v, window_size=(4, 0), backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_varlen_offsets_are_checked_on_every_cpu_call():
    """Values are read where that costs no synchronisation: a bad offset after the plan exists
    is still refused on the CPU."""
    q = torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    flash_attn_varlen_func(q, q, q, good, good, 6, 6, backend="torch")
    bad = torch.tensor([0, 7, 10], dtype=torch.int32)  # a sequence of 7 > max_seqlen 6
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attn_varlen_func(q, q, q, bad, bad, 6, 6, backend="torch")


def test_the_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(api, "MAX_PLANS", 3)
    api._plans.clear()
    for seqlen in range(1, 7):
        q = torch.randn(1, seqlen, 1, 8)
        flash_attn_func(q, q, q, backend="torch")
    assert len(api._plans) == 3


def test_a_plan_keeps_no_tensor_of_its_calls():
    """The launches keep what they read of the first call's tensors (shapes, strides), not the
    tensors: a bias or slopes freed by the caller is freed, gradients included."""
    import gc
    import weakref

    device, _ = device_and_dtypes("triton")
    q, k, v = (t.requires_grad_() for t in _qkv(device))
    bias = torch.randn(1, 2, 19, 19, device=device, requires_grad=True)
    slopes = torch.rand(2, device=device)
    api._plans.clear()
    out = flash_attn_func(q, k, v, attn_bias=bias, alibi_slopes=slopes, backend="triton")
    out.sum().backward()
    refs = [weakref.ref(t) for t in (bias, slopes, out)]
    del bias, slopes, out
    gc.collect()
    assert len(api._plans) == 1
    assert all(ref() is None for ref in refs)
