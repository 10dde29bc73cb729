"""flash_attn_with_kvcache: decoding token by token through the cache equals full attention."""

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_with_kvcache
from flash_attn.ops.rotary.reference import apply_rotary_ref
from tests.ops.attention_testing import BACKENDS, device_and_dtypes


def _rotary_tables(seqlen, rotary_dim, device):
    angles = torch.outer(
        torch.arange(seqlen, dtype=torch.float32),
        1.0 / 10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim),
    )
    return angles.cos().to(device), angles.sin().to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_token_by_token_decoding_equals_full_causal_attention(backend, num_splits):
    device, _ = device_and_dtypes(backend)
    batch, prompt, steps, nheads, nheads_k, headdim = 2, 37, 6, 2, 1, 32  # GQA 2:1
    total = prompt + steps
    q, k, v = (
        torch.randn(batch, total, h, headdim, device=device) for h in (nheads, nheads_k, nheads_k)
    )
    cos, sin = _rotary_tables(300, 16, device)
    k_cache = torch.zeros(batch, 300, nheads_k, headdim, device=device)
    v_cache = torch.zeros_like(k_cache)

    # Prefill the prompt, then one token at a time; each call appends and rotates in place.
    options = dict(
        rotary_cos=cos, rotary_sin=sin, causal=True, rotary_interleaved=False, backend=backend
    )
    outs = [
        flash_attn_with_kvcache(
            q[:, :prompt],
            k_cache,
            v_cache,
            k[:, :prompt],
            v[:, :prompt],
            cache_seqlens=0,
            num_splits=num_splits,
            **options,
        )
    ]
    for t in range(prompt, total):
        seqlens = torch.full((batch,), t, dtype=torch.int32, device=device)
        outs.append(
            flash_attn_with_kvcache(
                q[:, t : t + 1],
                k_cache,
                v_cache,
                k[:, t : t + 1],
                v[:, t : t + 1],
                cache_seqlens=seqlens,
                num_splits=num_splits,
                **options,
            )
        )
    decoded = torch.cat(outs, dim=1)

    q_rot = apply_rotary_ref(q, cos, sin)
    k_rot = apply_rotary_ref(k, cos, sin)
    full = flash_attn_func(q_rot, k_rot, v, causal=True, backend=backend)
    torch.testing.assert_close(decoded, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_cache[:, :total], k_rot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_cache[:, :total], v)
    assert torch.equal(k_cache[:, total:], torch.zeros_like(k_cache[:, total:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_cache_rows_batch_index_and_lse(backend):
    device, _ = device_and_dtypes(backend)
    nheads, headdim = 2, 16
    k_cache = torch.randn(5, 64, nheads, headdim, device=device)
    v_cache = torch.randn(5, 64, nheads, headdim, device=device)
    q = torch.randn(3, 2, nheads, headdim, device=device)
    seqlens = torch.tensor([10, 1, 63], dtype=torch.int32, device=device)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=seqlens,
        cache_batch_idx=rows,
        causal=True,
        num_splits=2,
        return_softmax_lse=True,
        backend=backend,
    )
    for b in range(3):
        length, row = int(seqlens[b]), int(rows[b])
        expected, expected_lse, _ = flash_attn_func(
            q[b : b + 1],
            k_cache[row : row + 1, :length],
            v_cache[row : row + 1, :length],
            causal=True,
            return_attn_probs=True,
            backend="torch",
        )
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse[b : b + 1], expected_lse, rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[1, :, 0]).all()  # one key, two queries: the first sees nothing


def test_bad_cache_input_is_rejected():
    q = torch.randn(2, 1, 4, 16)
    k_cache = torch.randn(2, 8, 4, 16)
    new = torch.randn(2, 3, 4, 16)
    with pytest.raises(ValueError, match="the cache is too short"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, new, cache_seqlens=6)
    with pytest.raises(ValueError, match="k and v must be given together"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), new, None, cache_seqlens=0)
    with pytest.raises(ValueError, match="cache_seqlens must be an int or an int32 tensor"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=torch.ones(2))
    with pytest.raises(ValueError, match=r"cache_batch_idx values must be in \[0, 2\)"):
        flash_attn_with_kvcache(
            q,
            k_cache,
            k_cache.clone(),
            cache_seqlens=1,
            cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match=r"cache_leftpad must be an int32 tensor of shape \(2,\)"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_leftpad=torch.zeros(2))
    leftpad = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_leftpad must be in \[0, cache_seqlens\]"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=3, cache_leftpad=leftpad)
    with pytest.raises(ValueError, match="duplicate|must not repeat a cache row"):
        flash_attn_with_kvcache(
            q,
            k_cache,
            k_cache.clone(),
            new[:, :1],
            new[:, :1],
            cache_seqlens=1,
            cache_batch_idx=torch.zeros(2, dtype=torch.int32),
        )
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, causal="no")
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, window_size=None)
    with pytest.raises(ValueError, match=r"block_table must be an int32 tensor of shape \(2, "):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), block_table=torch.zeros(2, 1))
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_table is too short"):  # 1 page of 8 positions
        flash_attn_with_kvcache(
            q, k_cache, k_cache.clone(), new, new, cache_seqlens=6, block_table=table
        )
    with pytest.raises(ValueError, match="cache_leftpad or block_table, not both"):
        flash_attn_with_kvcache(
            q,
            k_cache,
            k_cache.clone(),
            cache_seqlens=1,
            block_table=table,
            cache_leftpad=torch.zeros(2, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match=r"block_table values must be in \[0, 2\)"):
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=1, block_table=table + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_cache_equals_contiguous_cache(backend):
    """The same sequences in shuffled pages of 16 give what a contiguous cache gives."""
    device, _ = device_and_dtypes(backend)
    batch, nheads, nheads_k, headdim, page, pages = 3, 4, 2, 16, 16, 5
    capacity = page * pages
    contiguous = [torch.zeros(batch, capacity, nheads_k, headdim, device=device) for _ in "kv"]
    paged = [torch.zeros(batch * pages + 2, page, nheads_k, headdim, device=device) for _ in "kv"]
    order = torch.randperm(batch * pages + 2, generator=torch.Generator().manual_seed(0))
    table = order[: batch * pages].view(batch, pages).to(torch.int32).to(device)
    seqlens = torch.tensor([0, 17, 50], dtype=torch.int32, device=device)
    for step in range(3):  # a prompt, then two single tokens
        n = 20 if step == 0 else 1
        q = torch.randn(batch, n, nheads, headdim, device=device)
        k, v = (torch.randn(batch, n, nheads_k, headdim, device=device) for _ in "kv")
        options = dict(
            cache_seqlens=seqlens,
            causal=True,
            num_splits=2,
            backend=backend,
            return_softmax_lse=True,
        )
        expected, expected_lse = flash_attn_with_kvcache(q, *contiguous, k, v, **options)
        out, lse = flash_attn_with_kvcache(q, *paged, k, v, block_table=table, **options)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)
        seqlens = seqlens + n
    # The keys went to the pages the table names, and nowhere else.
    for b in range(batch):
        gathered = paged[0][table[b].long()].flatten(0, 1)
        torch.testing.assert_close(gathered, contiguous[0][b])
    unused = order[batch * pages :].to(device)
    assert torch.equal(paged[0][unused], torch.zeros_like(paged[0][unused]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_left_padded_cache_decodes_as_the_unpadded_cache(backend, num_splits):
    """Prompts of different lengths right-aligned in one cache (as batched generation pads
    them), with garbage in the padding, decode, rotary included, exactly as each prompt alone
    in an unpadded cache."""
    device, _ = device_and_dtypes(backend)
    batch, capacity, nheads, nheads_k, headdim = 3, 40, 2, 1, 32  # GQA 2:1
    lengths, width, steps = [9, 3, 14], 14, 3
    leftpad = torch.tensor([width - n for n in lengths], dtype=torch.int32, device=device)
    cos, sin = _rotary_tables(capacity, 16, device)
    options = dict(
        rotary_cos=cos,
        rotary_sin=sin,
        causal=True,
        rotary_interleaved=False,
        num_splits=num_splits,
        backend=backend,
    )
    padded = [
        torch.full((batch, capacity, nheads_k, headdim), float("nan"), device=device) for _ in "kv"
    ]
    alone = [torch.zeros(batch, capacity, nheads_k, headdim, device=device) for _ in "kv"]
    q = torch.randn(batch, width + steps, nheads, headdim, device=device)
    k, v = (torch.randn(batch, width + steps, nheads_k, headdim, device=device) for _ in "kv")

    def step(caches, b, rows, **cache_args):
        return flash_attn_with_kvcache(
            q[b, rows], *(c[b] for c in caches), k[b, rows], v[b, rows], **cache_args, **options
        )

    for b, n in enumerate(lengths):  # prefill: the prompt fills slots [leftpad, width)
        rows, one = slice(width - n, width), slice(b, b + 1)
        out = step(padded, one, rows, cache_seqlens=leftpad[one], cache_leftpad=leftpad[one])
        torch.testing.assert_close(out, step(alone, one, rows, cache_seqlens=0))
    for t in range(width, width + steps):  # decoding, the whole batch at once
        seqlens = torch.full((batch,), t, dtype=torch.int32, device=device)
        out = step(
            padded, slice(None), slice(t, t + 1), cache_seqlens=seqlens, cache_leftpad=leftpad
        )
        assert torch.isfinite(out).all()
        for b, n in enumerate(lengths):
            one = slice(b, b + 1)
            expected = step(alone, one, slice(t, t + 1), cache_seqlens=n + t - width)
            torch.testing.assert_close(out[one], expected, rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_the_decoding_step():
    """Under torch.compile (fullgraph) the Triton path appends to the cache and attends as
    eagerly, where eager calls take the one-launch cache update."""
    pytest.importorskip("triton")
    device, _ = device_and_dtypes("triton")
    q = torch.randn(2, 1, 4, 16, device=device)
    k, v = (torch.randn(2, 1, 2, 16, device=device) for _ in "kv")
    caches = [torch.randn(2, 32, 2, 16, device=device) for _ in "kv"]
    seqlens = torch.tensor([5, 17], dtype=torch.int32, device=device)

    def step(q, k_cache, v_cache, k, v, seqlens):
        return flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True, backend="triton"
        )

    eager_caches, compiled_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    eager = step(q, *eager_caches, k, v, seqlens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, *compiled_caches, k, v, seqlens), eager)
    for got, expected in zip(compiled_caches, eager_caches):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
