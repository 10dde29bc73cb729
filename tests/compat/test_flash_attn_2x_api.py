# ruff: noqa: E501 (the table holds the official signatures verbatim, one per line)
"""Code written for flash-attn 2.x runs unchanged: every official name imports from its official
path with the official argument order and defaults, and runs with positional arguments on both
backends. A rename on our side fails here.

The signatures are those of flash-attn 2.8 (the keyword-only extensions such as ``backend=``
come after them and are not checked).
"""

from __future__ import annotations

import pytest
import torch

import flash_attn
from flash_attn import bert_padding
from flash_attn.layers import rotary as rotary_layers
from flash_attn.ops.attention.reference import attention_ref
from tests.testing import kernel_device, official_signature_test

OFFICIAL_SIGNATURES = [
    (
        "flash_attn",
        "flash_attn_func",
        "q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    ),
    (
        "flash_attn",
        "flash_attn_qkvpacked_func",
        "qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    ),
    (
        "flash_attn",
        "flash_attn_kvpacked_func",
        "q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    ),
    (
        "flash_attn",
        "flash_attn_varlen_func",
        "q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None",
    ),
    (
        "flash_attn",
        "flash_attn_varlen_qkvpacked_func",
        "qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    ),
    (
        "flash_attn",
        "flash_attn_varlen_kvpacked_func",
        "q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    ),
    (
        "flash_attn",
        "flash_attn_with_kvcache",
        "q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False",
    ),
    ("flash_attn.bert_padding", "index_first_axis", "input, indices"),
    ("flash_attn.bert_padding", "index_put_first_axis", "values, indices, first_axis_dim"),
    ("flash_attn.bert_padding", "unpad_input", "hidden_states, attention_mask, unused_mask=None"),
    (
        "flash_attn.bert_padding",
        "unpad_input_for_concatenated_sequences",
        "hidden_states, attention_mask_in_length",
    ),
    ("flash_attn.bert_padding", "pad_input", "hidden_states, indices, batch, seqlen"),
    ("flash_attn.layers.rotary", "rotate_half", "x, interleaved=False"),
    ("flash_attn.layers.rotary", "apply_rotary_emb_torch", "x, cos, sin, interleaved=False"),
    (
        "flash_attn.layers.rotary",
        "apply_rotary_emb",
        "x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None",
    ),
    (
        "flash_attn.layers.rotary",
        "apply_rotary_emb_func",
        "x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None",
    ),
    (
        "flash_attn.layers.rotary",
        "apply_rotary_emb_qkv_",
        "qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0, num_heads_q=None",
    ),
    (
        "flash_attn.layers.rotary",
        "apply_rotary_emb_kv_",
        "kv, cos, sin, interleaved=False, seqlen_offsets=0",
    ),
    (
        "flash_attn.layers.rotary",
        "RotaryEmbedding.__init__",
        "dim, base=10000.0, interleaved=False, scale_base=None, device=None",
    ),
    (
        "flash_attn.layers.rotary",
        "RotaryEmbedding.forward",
        "qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None",
    ),
]


test_official_name_and_signature = official_signature_test(OFFICIAL_SIGNATURES)


# -- behaviour: official positional order, both backends ------------------------------------------

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch):
    """Runs the test with FLASH_ATTN_BACKEND set, on the device that backend serves here."""
    monkeypatch.setenv("FLASH_ATTN_BACKEND", request.param)
    return kernel_device() if request.param == "triton" else "cpu"


def _qkv(device, batch=2, seqlen=7, nheads=4, nheads_k=2, headdim=16):
    q = torch.randn(batch, seqlen, nheads, headdim, device=device)
    k = torch.randn(batch, seqlen, nheads_k, headdim, device=device)
    v = torch.randn(batch, seqlen, nheads_k, headdim, device=device)
    return q, k, v


def _close(actual, expected):
    # fp32 attention over 7 keys of 16 features: rounding well below 1e-5
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-5)


def test_dense_and_packed_attention(device):
    q, k, v = _qkv(device, nheads_k=4)
    expected = attention_ref(q, k, v, None, True, window_size=(3, 0))[0]
    # q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi, deterministic, probs
    _close(flash_attn.flash_attn_func(q, k, v, 0.0, None, True, (3, 0), 0.0, None, False), expected)
    qkv = torch.stack([q, k, v], dim=2)  # (B, S, 3, H, D)
    _close(flash_attn.flash_attn_qkvpacked_func(qkv, 0.0, None, True, (3, 0)), expected)
    kv = torch.stack([k, v], dim=2)  # (B, S, 2, H, D)
    _close(flash_attn.flash_attn_kvpacked_func(q, kv, 0.0, None, True, (3, 0)), expected)
    out, lse, probs = flash_attn.flash_attn_func(
        q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False, True
    )
    assert lse.shape == (2, 4, 7) and probs.shape == (2, 4, 7, 7)


def test_varlen_attention_and_padding_helpers(device):
    q, k, v = _qkv(device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[1, 5:] = False
    q_unpad, indices, cu_seqlens, max_seqlen, used = bert_padding.unpad_input(q, mask)
    k_unpad, v_unpad = (bert_padding.index_first_axis(t.flatten(0, 1), indices) for t in (k, v))
    assert used.tolist() == [7, 5] and max_seqlen == 7
    out = flash_attn.flash_attn_varlen_func(
        q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, None, True
    )
    out = bert_padding.pad_input(out, indices, 2, 7)
    for b, n in enumerate([7, 5]):
        expected = attention_ref(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], None, True)
        _close(out[b : b + 1, :n], expected[0])
    assert (out[1, 5:] == 0).all()
    k_full, v_full = (t.repeat_interleave(2, dim=1) for t in (k_unpad, v_unpad))  # GQA -> MHA
    qkv = torch.stack([q_unpad, k_full, v_full], dim=1)  # (total, 3, H, D)
    packed = flash_attn.flash_attn_varlen_qkvpacked_func(
        qkv, cu_seqlens, max_seqlen, 0.0, None, True
    )
    kv = torch.stack([k_unpad, v_unpad], dim=1)
    kvpacked = flash_attn.flash_attn_varlen_kvpacked_func(
        q_unpad, kv, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, None, True
    )
    _close(packed, bert_padding.index_first_axis(out.flatten(0, 1), indices))
    _close(kvpacked, packed)


def test_kvcache_decoding(device):
    q, k, v = _qkv(device, seqlen=1)
    k_cache = torch.zeros(2, 16, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    history = _qkv(device, seqlen=5)
    k_cache[:, :5], v_cache[:, :5] = history[1], history[2]
    cache_seqlens = torch.tensor([5, 5], dtype=torch.int32, device=device)
    out = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, None, None, cache_seqlens, None, None, None, None, True
    )
    keys, values = torch.cat([history[1], k], 1), torch.cat([history[2], v], 1)
    _close(out, attention_ref(q, keys, values, None, True)[0])
    _close(k_cache[:, 5:6], k)  # the new key was appended in place


def test_varlen_with_block_table(device):
    """Paged prefill: the sequences' keys and values live in pages of 4 named by block_table."""
    q, k, v = _qkv(device, batch=1, seqlen=9)
    q, k, v = q[0], k[0], v[0]  # (9, H, D): sequences of 5 and 4 queries, of 6 and 3 keys
    cu_seqlens_q = torch.tensor([0, 5, 9], dtype=torch.int32, device=device)
    cu_seqlens_k = torch.tensor([0, 6, 9], dtype=torch.int32, device=device)
    block_table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32, device=device)
    k_cache, v_cache = (torch.full((4, 4, 2, 16), float("nan"), device=device) for _ in "kv")
    for cache, packed in ((k_cache, k), (v_cache, v)):
        cache[3], cache[0, :2], cache[1, :3] = packed[:4], packed[4:6], packed[6:9]
    with torch.no_grad():
        # q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, window, softcap, alibi,
        # deterministic, return_attn_probs, block_table
        out = flash_attn.flash_attn_varlen_func(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q,
            cu_seqlens_k,
            5,
            6,
            0.0,
            None,
            True,
            (-1, -1),
            0.0,
            None,
            False,
            False,
            block_table,
        )
    for rows, keys in ((slice(0, 5), slice(0, 6)), (slice(5, 9), slice(6, 9))):
        expected = attention_ref(q[None, rows], k[None, keys], v[None, keys], None, True)[0]
        _close(out[None, rows], expected)


def test_kvcache_with_cache_leftpad(device):
    """Each cache row's tokens start at cache_leftpad; the slots before it are never read."""
    q, k, v = _qkv(device, seqlen=1)
    history = _qkv(device, seqlen=6)
    k_cache, v_cache = (torch.full((2, 16, 2, 16), float("nan"), device=device) for _ in "kv")
    cache_leftpad = torch.tensor([2, 5], dtype=torch.int32, device=device)
    cache_seqlens = torch.tensor([6, 6], dtype=torch.int32, device=device)
    for b, start in enumerate(cache_leftpad.tolist()):
        k_cache[b, start:6], v_cache[b, start:6] = history[1][b, start:], history[2][b, start:]
    # q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
    # cache_leftpad, block_table, softmax_scale, causal
    out = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, None, None, cache_seqlens, None, cache_leftpad, None, None, True
    )
    for b, start in enumerate(cache_leftpad.tolist()):
        keys = torch.cat([history[1][b : b + 1, start:], k[b : b + 1]], 1)
        values = torch.cat([history[2][b : b + 1, start:], v[b : b + 1]], 1)
        _close(out[b : b + 1], attention_ref(q[b : b + 1], keys, values, None, True)[0])
    _close(k_cache[:, 6:7], k)  # appended after cache_seqlens


def test_unpad_input_with_unused_mask_and_concatenated_sequences():
    hidden = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    packed, indices, cu_seqlens, max_seqlen, used = bert_padding.unpad_input(hidden, mask, unused)
    assert packed.flatten().tolist() == [0, 1, 2, 3, 6, 7]
    assert cu_seqlens.tolist() == [0, 4, 6] and max_seqlen == 4 and used.tolist() == [3, 2]
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]])
    packed, indices, cu_seqlens, max_seqlen = bert_padding.unpad_input_for_concatenated_sequences(
        hidden, lengths
    )
    assert packed.flatten().tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert cu_seqlens.tolist() == [0, 2, 5, 9] and max_seqlen == 4
    restored = bert_padding.index_put_first_axis(packed, indices, 12).view(2, 6, 1)
    assert restored[0, :5].flatten().tolist() == [0, 1, 2, 3, 4] and restored[0, 5] == 0


def test_rotary_layers(device):
    qkv = torch.randn(2, 7, 3, 4, 16, device=device)
    rotary = rotary_layers.RotaryEmbedding(16, 10000.0, False, None, device)
    cos, sin = rotary.cos_sin(7, qkv.device, qkv.dtype)
    expected_q = rotary_layers.apply_rotary_emb_torch(qkv[:, :, 0], cos[:7], sin[:7], False)
    expected_k = rotary_layers.apply_rotary_emb_torch(qkv[:, :, 1], cos[:7], sin[:7], False)
    v = qkv[:, :, 2].clone()
    out = rotary(qkv, None, 0, None, None)
    assert out is qkv  # in place, as the official module
    _close(qkv[:, :, 0], expected_q)
    _close(qkv[:, :, 1], expected_k)
    assert torch.equal(qkv[:, :, 2], v)
    x = torch.randn(2, 7, 4, 16, device=device)
    _close(
        rotary_layers.apply_rotary_emb(x, cos, sin, False, False, 0, None, None),
        rotary_layers.apply_rotary_emb_torch(x, cos[:7], sin[:7]),
    )
    kv = torch.randn(2, 7, 2, 4, 16, device=device)
    k = kv[:, :, 0].clone()
    rotary_layers.apply_rotary_emb_kv_(kv, cos, sin, False, 0)
    _close(kv[:, :, 0], rotary_layers.apply_rotary_emb_torch(k, cos[:7], sin[:7]))


def test_kvcache_rotary_positions_with_cache_leftpad(device):
    """As the official kernel and docstring: the new keys are rotated at cache_seqlens,
    cache_seqlens + 1, ..., also when cache_leftpad is given (q too, when causal)."""
    q, k, v = _qkv(device, seqlen=2)
    k_cache, v_cache = (torch.zeros(2, 16, 2, 16, device=device) for _ in "kv")
    cos, sin = (torch.randn(16, 8, device=device) for _ in range(2))
    cache_leftpad = torch.tensor([2, 5], dtype=torch.int32, device=device)
    cache_seqlens = torch.tensor([6, 9], dtype=torch.int32, device=device)
    # q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
    # cache_leftpad, block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved
    flash_attn.flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cos,
        sin,
        cache_seqlens,
        None,
        cache_leftpad,
        None,
        None,
        True,
        (-1, -1),
        0.0,
        False,
    )
    expected = rotary_layers.apply_rotary_emb(k, cos, sin, seqlen_offsets=cache_seqlens)
    for b, start in enumerate(cache_seqlens.tolist()):
        _close(k_cache[b, start : start + 2], expected[b])


@pytest.mark.parametrize("layout", ["qkv", "qkv_num_heads_q", "kv"])
def test_inplace_rotary_on_a_leaf_that_requires_grad(device, layout):
    """As the official autograd functions: the leaf is overwritten, its gradient is that of the
    out-of-place rotation."""
    cos, sin, cos_k, sin_k = (torch.randn(9, 8, device=device) for _ in range(4))
    rotate = rotary_layers.apply_rotary_emb  # out of place
    shapes = {
        "qkv": (2, 7, 3, 4, 16),
        "qkv_num_heads_q": (2, 7, 4 + 2 * 2, 16),
        "kv": (2, 7, 2, 4, 16),
    }
    packed = torch.randn(shapes[layout], device=device)
    leaf, x = packed.clone().requires_grad_(), packed.clone().requires_grad_()
    if layout == "qkv":
        out = rotary_layers.apply_rotary_emb_qkv_(leaf, cos, sin, cos_k, sin_k, False, 0)
        parts = [rotate(x[:, :, 0], cos, sin), rotate(x[:, :, 1], cos_k, sin_k), x[:, :, 2]]
        expected = torch.stack(parts, dim=2)
    elif layout == "qkv_num_heads_q":
        out = rotary_layers.apply_rotary_emb_qkv_(leaf, cos, sin, cos_k, sin_k, False, 0, 4)
        parts = [rotate(x[:, :, :4], cos, sin), rotate(x[:, :, 4:6], cos_k, sin_k), x[:, :, 6:]]
        expected = torch.cat(parts, dim=2)
    else:
        out = rotary_layers.apply_rotary_emb_kv_(leaf, cos, sin, False, 0)
        expected = torch.stack([rotate(x[:, :, 0], cos, sin), x[:, :, 1]], dim=2)
    _close(leaf.detach(), expected.detach())
    _close(out.detach(), expected.detach())
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    _close(leaf.grad, x.grad)


def test_xpos_scales_q_and_k_inversely():
    """XPos changes q and k but not their dot product at equal positions' distance 0."""
    rotary = rotary_layers.RotaryEmbedding(16, scale_base=512)
    qkv = torch.randn(1, 5, 3, 2, 16)
    plain = rotary_layers.RotaryEmbedding(16)(qkv.clone())
    scaled = rotary(qkv.clone())
    assert not torch.allclose(scaled[:, :, 0], plain[:, :, 0])
    # per position, q is scaled by s and k by 1 / s: the same-position score is unchanged
    same_position = (scaled[:, :, 0] * scaled[:, :, 1]).sum(-1)
    torch.testing.assert_close(same_position, (plain[:, :, 0] * plain[:, :, 1]).sum(-1))
