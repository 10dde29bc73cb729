"""The paper's tiled algorithm (forward and backward) against standard attention in fp64."""

import pytest
import torch

from flash_attn.ops.attention.reference import attention_ref, causal_allowed
from flash_attn.ops.attention.tiled import (
    Tiling,
    attention_tiled,
    attention_tiled_bwd,
    attention_tiled_fwd,
)

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, block_m, block_n)
SHAPES = [
    (1, 1, 1, 1, 1, 8, 64, 64),
    (2, 7, 113, 4, 2, 16, 16, 5),  # seqlen_q < seqlen_k, GQA 2
    (1, 113, 7, 3, 3, 32, 13, 64),  # seqlen_q > seqlen_k: causal leaves rows empty
    (2, 113, 113, 6, 2, 8, 32, 48),  # GQA 3, blocks that do not divide 113
]


def _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype=torch.float64):
    q = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, requires_grad=True)
    return q, k, v


def _random_mask(batch, nheads, seqlen_q, seqlen_k):
    mask = torch.rand(batch, nheads, seqlen_q, seqlen_k) < 0.3
    mask[:, :, seqlen_q // 2] = False  # one fully masked row per head
    mask[0, 0, :] = False  # and one fully masked head
    return mask


def _close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_reference_fp64(shape, causal):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, block_m, block_n = shape
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
    out_ref, lse_ref, _ = attention_ref(q, k, v, causal=causal)
    out, lse = attention_tiled(
        q, k, v, causal=causal, block_m=block_m, block_n=block_n, return_lse=True
    )
    _close(out, out_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    _close(lse.nan_to_num(posinf=0.0), lse_ref.nan_to_num(posinf=0.0))

    do = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), do)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), name
        _close(g, g_ref)


def test_backward_is_the_papers_not_autograd_through_loops():
    q, k, v = _qkv(1, 33, 21, 2, 1, 8)
    out = attention_tiled(q, k, v, block_m=8, block_n=8)
    assert type(out.grad_fn).__name__ == "AttentionTiledFunctionBackward"
    # Only q, k, v, out and lse are saved: no (seqlen_q, seqlen_k) tensor.
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention_tiled(q, k, v, block_m=8, block_n=8)
    assert max(torch.Size(s).numel() for s in saved) == 33 * 2 * 8


@pytest.mark.parametrize("causal", [False, True])
def test_random_mask_with_fully_masked_rows(causal):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = 2, 37, 29, 4, 2, 8
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
    mask = _random_mask(batch, nheads, seqlen_q, seqlen_k)
    out_ref, lse_ref, _ = attention_ref(q, k, v, causal=causal, attn_bias=mask)
    out, lse = attention_tiled(
        q, k, v, causal=causal, mask=mask, block_m=8, block_n=7, return_lse=True
    )
    _close(out, out_ref)
    allowed = mask & causal_allowed(seqlen_q, seqlen_k) if causal else mask
    empty = ~allowed.any(-1)  # (B, H, Sq)
    assert empty[:, :, seqlen_q // 2].all()
    assert torch.isposinf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert (out.transpose(1, 2)[empty] == 0).all()

    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for g, g_ref in zip(grads, torch.autograd.grad(out_ref, (q, k, v), do)):
        assert torch.isfinite(g).all()
        _close(g, g_ref)
    # Queries with no visible key get exactly zero gradient.
    assert (grads[0].transpose(1, 2)[empty] == 0).all()


def test_mask_broadcasts_and_equals_causal():
    q, k, v = _qkv(2, 19, 23, 2, 2, 8)
    out_causal = attention_tiled(q, k, v, causal=True, block_m=5, block_n=6)
    out_mask = attention_tiled(q, k, v, mask=causal_allowed(19, 23), block_m=5, block_n=6)
    _close(out_mask, out_causal)
    # The oracle with a mask agrees with attention_ref too.
    _close(
        attention_ref(q, k, v, attn_bias=causal_allowed(19, 23))[0],
        attention_ref(q, k, v, causal=True)[0],
    )


def test_autograd_through_the_tiled_forward_matches_the_papers_backward():
    q, k, v = _qkv(1, 20, 13, 4, 2, 8)
    mask = _random_mask(1, 4, 20, 13)
    tiling = Tiling(causal=True, mask=mask, block_m=6, block_n=4)
    out, lse = attention_tiled_fwd(q, k, v, tiling)
    do = torch.randn_like(out)
    through_loops = torch.autograd.grad(out, (q, k, v), do)
    papers = attention_tiled_bwd(do, q, k, v, out.detach(), lse, tiling)
    for a, b in zip(papers, through_loops):
        _close(a, b)


def test_jacrev_through_the_function():
    q, k, v = (t.detach() for t in _qkv(1, 9, 6, 2, 1, 4))
    f_tiled = lambda q, k, v: attention_tiled(q, k, v, causal=True, block_m=4, block_n=4).sum()  # noqa: E731
    f_ref = lambda q, k, v: attention_ref(q, k, v, causal=True)[0].sum()  # noqa: E731
    grads = torch.func.jacrev(f_tiled, argnums=(0, 1, 2))(q, k, v)
    grads_ref = torch.func.jacrev(f_ref, argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_low_precision_within_twice_plain_pytorch_error(dtype):
    q, k, v = _qkv(2, 113, 77, 4, 2, 32)
    do = torch.randn(2, 113, 4, 32, dtype=torch.float64)
    out_ref, _, _ = attention_ref(q, k, v, causal=True)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), do)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out_pt, _, _ = attention_ref(*low, causal=True)
    grads_pt = torch.autograd.grad(out_pt, low, do.to(dtype))
    out = attention_tiled(*low, causal=True, block_m=32, block_n=16)
    grads = torch.autograd.grad(out, low, do.to(dtype))
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for ours, plain, ref in zip((out, *grads), (out_pt, *grads_pt), (out_ref, *grads_ref)):
        err = (ours.double() - ref).abs().max().item()
        err_pt = (plain.double() - ref).abs().max().item()
        assert err <= 2 * err_pt + atol, (err, err_pt)


def test_bad_inputs_name_the_argument():
    q, k, v = (t.detach() for t in _qkv(1, 4, 4, 3, 2, 8))
    with pytest.raises(ValueError, match="nheads"):
        attention_tiled(q, k, v)
    q, k, v = (t.detach() for t in _qkv(1, 4, 4, 2, 2, 8))
    with pytest.raises(TypeError, match="mask"):
        attention_tiled(q, k, v, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask"):
        attention_tiled(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_m"):
        attention_tiled(q, k, v, block_m=0)
    with pytest.raises(TypeError, match="dtype"):
        attention_tiled(q, k.float(), v)
