"""MHA against a plain PyTorch attention written out in the test."""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn.models.generation import InferenceParams
from flash_attn.modules.mha import MHA, alibi_slopes

E = 48  # embed_dim: 6 heads of 8, or 4 heads of 12


def _rotate(x, dim, base, interleaved, positions):
    """Plain RoPE on the first dim features of x (B, S, H, D) at positions (S,)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq  # (S, dim / 2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # (1, S, 1, dim / 2)
    rot, rest = x[..., :dim].double(), x[..., dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def mha_ref(mha: MHA, x, x_kv=None, key_padding_mask=None, window=None):
    """Materialised-softmax attention with the module's weights (fp64)."""
    h, h_kv, d = mha.num_heads, mha.num_heads_kv, mha.head_dim
    x = x.double()
    if mha.cross_attn:
        q = x @ mha.Wq.weight.double().T + mha.Wq.bias.double()
        kv = x_kv.double() @ mha.Wkv.weight.double().T + mha.Wkv.bias.double()
        k, v = kv.split(h_kv * d, dim=-1)
    else:
        qkv = x @ mha.Wqkv.weight.double().T
        if mha.Wqkv.bias is not None:
            qkv = qkv + mha.Wqkv.bias.double()
        q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    q = q.unflatten(-1, (h, d))  # (B, Sq, H, D)
    k, v = k.unflatten(-1, (h_kv, d)), v.unflatten(-1, (h_kv, d))  # (B, Sk, H_kv, D)
    if mha.rotary_emb is not None:
        r = mha.rotary_emb
        q = _rotate(q, r.dim, r.base, r.interleaved, torch.arange(q.shape[1]))
        k = _rotate(k, r.dim, r.base, r.interleaved, torch.arange(k.shape[1]))
    k = k.repeat_interleave(h // h_kv, dim=2)  # (B, Sk, H_kv, D) -> (B, Sk, H, D)
    v = v.repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if mha.causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j <= window
    if mha.alibi_slopes is not None:
        scores = scores - mha.alibi_slopes.double()[:, None, None] * (i - j).abs()
    mask = allowed[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(-2)
    out = out @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()
    if key_padding_mask is not None and not mha.cross_attn:
        out = out * key_padding_mask[..., None]
    return out


def _mha(**kwargs):
    torch.manual_seed(0)
    return MHA(E, kwargs.pop("num_heads", 6), backend=kwargs.pop("backend", "torch"), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, num_heads_kv=2),  # GQA
        dict(causal=True, num_heads_kv=1, qkv_proj_bias=False),  # MQA
        dict(causal=True, rotary_emb_dim=8),
        dict(causal=True, num_heads=4, rotary_emb_dim=6, rotary_emb_interleaved=True),
        dict(causal=True, use_alibi=True),
    ],
)
def test_self_attention(kwargs):
    mha = _mha(**kwargs)
    x = torch.randn(2, 13, E)
    torch.testing.assert_close(mha(x).double(), mha_ref(mha, x), atol=2e-5, rtol=0)


def test_sliding_window():
    mha = _mha(causal=True, window_size=(3, 0))
    x = torch.randn(2, 11, E)
    torch.testing.assert_close(mha(x).double(), mha_ref(mha, x, window=3), atol=2e-5, rtol=0)


@pytest.mark.parametrize("num_heads_kv", [None, 3])
def test_cross_attention(num_heads_kv):
    mha = _mha(cross_attn=True, num_heads_kv=num_heads_kv)
    assert not hasattr(mha, "Wqkv")
    x, x_kv = torch.randn(2, 7, E), torch.randn(2, 10, E)
    torch.testing.assert_close(mha(x, x_kv).double(), mha_ref(mha, x, x_kv), atol=2e-5, rtol=0)
    mask = torch.arange(10)[None] < torch.tensor([[10], [4]])
    out = mha(x, x_kv, key_padding_mask=mask).double()
    torch.testing.assert_close(out, mha_ref(mha, x, x_kv, mask), atol=2e-5, rtol=0)


@pytest.mark.parametrize("rotary", [0, 8])
def test_padded_batch(rotary):
    mha = _mha(causal=True, num_heads_kv=2, rotary_emb_dim=rotary)
    x = torch.randn(3, 9, E)
    lengths = torch.tensor([9, 1, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    out = mha(x, key_padding_mask=mask)
    assert torch.all(out[~mask] == 0)
    # Each padded row equals the same sequence run alone, unpadded.
    for b, n in enumerate(lengths.tolist()):
        alone = mha_ref(mha, x[b : b + 1, :n])
        torch.testing.assert_close(out[b : b + 1, :n].double(), alone, atol=2e-5, rtol=0)


def test_varlen_equals_separate_sequences():
    mha = _mha(causal=True, rotary_emb_dim=8, num_heads_kv=3)
    lengths = [5, 1, 8]
    seqs = [torch.randn(n, E) for n in lengths]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    out = mha(torch.cat(seqs), cu_seqlens=cu, max_seqlen=8)
    assert out.shape == (14, E)
    for s, start in zip(seqs, cu[:-1].tolist()):
        alone = mha_ref(mha, s[None])[0]
        torch.testing.assert_close(out[start : start + len(s)].double(), alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_heads_kv=2, rotary_emb_dim=8),
        dict(num_heads=4, rotary_emb_dim=12, rotary_emb_interleaved=True),
        dict(use_alibi=True, window_size=(4, 0)),
    ],
)
def test_kv_cache_decoding_equals_full_forward(kwargs):
    mha = _mha(causal=True, layer_idx=0, **kwargs)
    x = torch.randn(2, 12, E)
    full = mha(x)
    params = InferenceParams(max_seqlen=16, max_batch_size=2)
    outs = [mha(x[:, :5], inference_params=params)]  # prefill
    params.seqlen_offset = 5
    for t in range(5, 12):
        outs.append(mha(x[:, t : t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=0)


def test_triton_backend_matches_reference(monkeypatch):
    pytest.importorskip("triton")
    mha = _mha(causal=True, num_heads_kv=2, rotary_emb_dim=8, backend="triton")
    x = torch.randn(1, 9, E)
    torch.testing.assert_close(mha(x).double(), mha_ref(mha, x), atol=2e-5, rtol=0)


def test_gradients_flow():
    mha = _mha(causal=True, num_heads_kv=2)
    x = torch.randn(2, 6, E, requires_grad=True)
    x64 = x.detach().clone().requires_grad_()
    mha(x).square().sum().backward()
    mha_ref(mha, x64).square().sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-4, rtol=1e-4)


def test_alibi_slopes_standard():
    torch.testing.assert_close(alibi_slopes(8), 2.0 ** -torch.arange(1, 9, dtype=torch.float32))
    assert alibi_slopes(6).shape == (6,)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_heads"):
        MHA(E, 5)
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(E, 6, num_heads_kv=4)
    mha = _mha(causal=True)
    with pytest.raises(ValueError, match="embed_dim=48"):
        mha(torch.randn(2, 3, 40))
    with pytest.raises(ValueError, match="x_kv"):
        mha(torch.randn(2, 3, E), torch.randn(2, 3, E))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(torch.randn(2, 3, E), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seqlen"):
        mha(torch.randn(6, E), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="layer_idx"):
        mha(torch.randn(1, 3, E), inference_params=InferenceParams(8, 1))
    with pytest.raises(TypeError, match="floating-point"):
        mha(torch.ones(2, 3, E, dtype=torch.long))
