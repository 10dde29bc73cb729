"""Keys that a query may not see contribute exactly nothing to it, even when they hold NaN or
inf: causal and window masks, varlen and unpadded padding, cache slots past cache_seqlens or
before cache_leftpad (a cache allocated with torch.empty holds such garbage). The rows that
cannot see a bad key are finite and equal the clean result; the rows that see one give NaN, as
0 * NaN would in any attention."""

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn.bert_padding import index_first_axis, unpad_input
from flash_attn.ops.attention.reference import window_allowed
from tests.ops.attention_testing import BACKENDS, device_and_dtypes

GARBAGE = [float("nan"), float("inf"), float("-inf")]


def _spoil(t: torch.Tensor, index, value=float("nan")) -> torch.Tensor:
    """A copy of t with t[index] = value: one key's whole vector, or a single entry."""
    spoiled = t.clone()
    spoiled[index] = value
    return spoiled


def _assert_only_seeing_rows_spoiled(out, clean, seeing):
    """out, clean (batch, seqlen_q, nheads, headdim); seeing (seqlen_q,) bool."""
    assert torch.isfinite(out[:, ~seeing]).all(), "a row that cannot see the bad key is not finite"
    torch.testing.assert_close(out[:, ~seeing], clean[:, ~seeing], rtol=0, atol=0)
    assert not torch.isfinite(out[:, seeing]).all(-1).any(), "a row that sees it stayed finite"


MASKS = [
    dict(causal=True),
    dict(window_size=(6, 3)),
    dict(causal=True, window_size=(9, -1)),
    dict(causal=True, softcap=3.0),  # the naive path on the torch backend
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", MASKS, ids=lambda o: "-".join(map(str, o.items())))
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(70, 70), (33, 81)])
def test_bad_key_reaches_only_the_rows_that_see_it(backend, options, seqlen_q, seqlen_k):
    device, dtypes = device_and_dtypes(backend)
    for dtype in dtypes:
        # One sequence, two query heads on one key head (GQA): a mask is the same for all.
        q = torch.randn(1, seqlen_q, 2, 16, dtype=dtype, device=device)
        k, v = (torch.randn(1, seqlen_k, 1, 16, dtype=dtype, device=device) for _ in "kv")
        clean = flash_attn_func(q, k, v, backend=backend, **options)
        allowed = window_allowed(
            seqlen_q, seqlen_k, options.get("causal", False), options.get("window_size", (-1, -1))
        )
        for j, value in zip((seqlen_k - 20, seqlen_k - 9, seqlen_k - 1), GARBAGE):
            # NaN or inf in every entry of key j's k and in one entry of its v.
            spoiled_k = _spoil(k, (slice(None), j), value)
            spoiled_v = _spoil(v, (slice(None), j, 0, 5), value)
            out = flash_attn_func(q, spoiled_k, spoiled_v, backend=backend, **options)
            _assert_only_seeing_rows_spoiled(out, clean, allowed[:, j].to(device))


def test_torch_path_guards_only_when_a_key_may_be_bad(monkeypatch):
    """The exact guard (copies of k and v without their NaN/inf, the rows that see one) costs
    about a tenth of a CPU training step: it runs only when a sum of k and v is not finite."""
    from flash_attn.ops.attention import torch_backend as attention_torch

    guarded = []
    exact_guard = attention_torch.nonfinite_to_zero
    monkeypatch.setattr(
        attention_torch, "nonfinite_to_zero", lambda x: guarded.append(x) or exact_guard(x)
    )
    q, k, v = (torch.randn(2, 9, 2, 16) for _ in "qkv")
    flash_attn_func(q, k, v, causal=True, backend="torch")
    assert not guarded
    out = flash_attn_func(q, _spoil(k, (slice(None), 8)), v, causal=True, backend="torch")
    assert guarded
    _assert_only_seeing_rows_spoiled(
        out, flash_attn_func(q, k, v, causal=True, backend="torch"), torch.arange(9) >= 8
    )


def test_bad_key_outside_long_windows_on_the_banded_torch_path():
    """Sequences longer than the torch backend's query chunk, with a window: chunk by chunk."""
    q, k, v = (torch.randn(1, 300, 2, 8) for _ in "qkv")
    clean = flash_attn_func(q, k, v, window_size=(20, 0), backend="torch")
    out = flash_attn_func(q, k, _spoil(v, (0, 140)), window_size=(20, 0), backend="torch")
    _assert_only_seeing_rows_spoiled(out, clean, window_allowed(300, 300, False, (20, 0))[:, 140])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_keys_of_other_sequences_and_of_padding(backend):
    """Varlen: a sequence never sees another's keys; unpad_input drops padded keys."""
    device, _ = device_and_dtypes(backend)
    q, k, v = (torch.randn(3, 24, 2, 16, device=device) for _ in "qkv")
    mask = torch.arange(24, device=device)[None, :] < torch.tensor([[24], [9], [17]], device=device)
    spoiled_k, spoiled_v = (_spoil(t, ~mask) for t in (k, v))  # every padded key is NaN
    outs = []
    for keys, values in ((k, v), (spoiled_k, spoiled_v)):
        q_unpad, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, mask)
        k_unpad, v_unpad = (index_first_axis(t.flatten(0, 1), indices) for t in (keys, values))
        outs.append(
            flash_attn_varlen_func(
                q_unpad,
                k_unpad,
                v_unpad,
                cu_seqlens,
                cu_seqlens,
                max_seqlen,
                max_seqlen,
                causal=True,
                backend=backend,
            )
        )
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    # NaN in all keys of the second sequence leaves the first and third untouched.
    first, end = int(cu_seqlens[1]), int(cu_seqlens[2])
    out = flash_attn_varlen_func(
        q_unpad,
        _spoil(k_unpad, slice(first, end)),
        v_unpad,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        backend=backend,
    )
    clean = flash_attn_varlen_func(
        q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, backend=backend
    )
    others = torch.ones(out.shape[0], dtype=torch.bool, device=device)
    others[first:end] = False
    torch.testing.assert_close(out[others], clean[others], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_garbage_past_seqlens_and_before_leftpad(backend, num_splits):
    """A cache from torch.empty (here: NaN) outside [cache_leftpad, cache_seqlens + new)."""
    device, _ = device_and_dtypes(backend)
    batch, capacity, nheads_k, headdim = 3, 96, 2, 16
    leftpad = torch.tensor([0, 7, 30], dtype=torch.int32, device=device)
    seqlens = torch.tensor([5, 40, 30], dtype=torch.int32, device=device)
    caches = {}
    for fill in ("zeros", "garbage"):
        k_cache, v_cache = (
            torch.full(
                (batch, capacity, nheads_k, headdim),
                0.0 if fill == "zeros" else float("nan"),
                device=device,
            )
            for _ in "kv"
        )
        caches[fill] = (k_cache, v_cache)
    for b in range(batch):
        start, end = int(leftpad[b]), int(seqlens[b])
        for name in "kv":
            history = torch.randn(end - start, nheads_k, headdim, device=device)
            for k_cache, v_cache in caches.values():
                (k_cache if name == "k" else v_cache)[b, start:end] = history
    q = torch.randn(batch, 4, 4, headdim, device=device)
    k, v = (torch.randn(batch, 4, nheads_k, headdim, device=device) for _ in "kv")
    outs = {
        fill: flash_attn_with_kvcache(
            q,
            *cache,
            k,
            v,
            cache_seqlens=seqlens,
            cache_leftpad=leftpad,
            causal=True,
            num_splits=num_splits,
            backend=backend,
        )
        for fill, cache in caches.items()
    }
    assert torch.isfinite(outs["garbage"]).all()
    torch.testing.assert_close(outs["garbage"], outs["zeros"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_cache_garbage_in_unused_slots(backend):
    device, _ = device_and_dtypes(backend)
    pages = [torch.full((6, 8, 1, 16), float("nan"), device=device) for _ in "kv"]
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([11, 3], dtype=torch.int32, device=device)
    keys, values = [], []
    for b in range(2):
        for cache, kept in zip(pages, (keys, values)):
            seq = torch.randn(int(seqlens[b]), 1, 16, device=device)
            positions = torch.arange(int(seqlens[b]), device=device)
            cache[table[b].long()[positions // 8], positions % 8] = seq
            kept.append(seq)
    q = torch.randn(2, 2, 2, 16, device=device)
    out = flash_attn_with_kvcache(
        q, *pages, cache_seqlens=seqlens, block_table=table, causal=True, backend=backend
    )
    for b in range(2):
        expected = flash_attn_func(
            q[b : b + 1], keys[b][None], values[b][None], causal=True, backend=backend
        )
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", MASKS[:3], ids=lambda o: "-".join(map(str, o.items())))
def test_bad_key_gradient_reaches_only_the_rows_that_see_it(backend, options):
    """dQ of the rows that cannot see a NaN/inf key equals the clean dQ (the masked tile's
    0 * NaN in dO v^T and in dS k stays 0)."""
    device, dtypes = device_and_dtypes(backend)
    seqlen = 70
    allowed = window_allowed(
        seqlen, seqlen, options.get("causal", False), options.get("window_size", (-1, -1))
    )
    for dtype in dtypes:
        q = torch.randn(1, seqlen, 2, 16, dtype=dtype, device=device)
        k, v = (torch.randn(1, seqlen, 1, 16, dtype=dtype, device=device) for _ in "kv")
        dout = torch.randn_like(q)
        grads = []
        for j, value in ((None, None), (seqlen - 9, float("nan")), (seqlen - 1, float("inf"))):
            keys, values = (
                (k, v) if j is None else (_spoil(t, (slice(None), j), value) for t in (k, v))
            )
            query = q.clone().requires_grad_()
            flash_attn_func(query, keys, values, backend=backend, **options).backward(dout)
            grads.append((j, query.grad))
        clean = grads[0][1]
        for j, dq in grads[1:]:
            unseen = ~allowed[:, j].to(device)
            assert torch.isfinite(dq[:, unseen]).all(), (j, "a row that cannot see it")
            torch.testing.assert_close(dq[:, unseen], clean[:, unseen], rtol=0, atol=0)
