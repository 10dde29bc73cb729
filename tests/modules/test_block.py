"""Block / ParallelBlock / GPT2Embeddings / Mlp against their formulas in plain PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.embedding import GPT2Embeddings
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, Mlp
from flash_attn.modules.norm import LayerNorm, RMSNorm

D = 32


def _parts(norm_cls=LayerNorm):
    torch.manual_seed(0)
    attn = MHA(D, 4, causal=True, backend="torch")
    mlp = Mlp(D, 3 * D)
    ln_1, ln_2 = (norm_cls(D, prenorm=True, backend="torch") for _ in range(2))
    with torch.no_grad():  # non-trivial norm weights
        for ln in (ln_1, ln_2):
            ln.weight.uniform_(0.5, 1.5)
            if ln.bias is not None:
                ln.bias.uniform_(-0.5, 0.5)
    return attn, mlp, ln_1, ln_2


def _norm(ln, x):
    if isinstance(ln, RMSNorm):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + ln.eps) * ln.weight
    return F.layer_norm(x, (D,), ln.weight, ln.bias, ln.eps)


@pytest.mark.parametrize("norm_cls", [LayerNorm, RMSNorm])
def test_two_blocks_chain_equals_prenorm_formula(norm_cls):
    attn, mlp, ln_1, ln_2 = _parts(norm_cls)
    block = Block(attn, mlp, ln_1, ln_2)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        h = x + attn(_norm(ln_1, x))
        h = h + mlp(_norm(ln_2, h))
        h = h + attn(_norm(ln_1, h))
        expected = h + mlp(_norm(ln_2, h))
        out, residual = block(x)
        out, residual = block(out, residual)
    torch.testing.assert_close(out + residual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_parallel_block_equals_parallel_formula(tied):
    attn, mlp, ln_1, ln_2 = _parts()
    ln_2.prenorm = False  # the second norm reads the residual and returns its norm only
    ln_2 = ln_1 if tied else ln_2
    block = ParallelBlock(attn, mlp, ln_1, None if tied else ln_2)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        h = x + attn(_norm(ln_1, x)) + mlp(_norm(ln_2, x))
        expected = h + attn(_norm(ln_1, h)) + mlp(_norm(ln_2, h))
        a, m, residual = block(x)
        a, m, residual = block(a, m, residual)
    torch.testing.assert_close(a + m + residual, expected, atol=1e-5, rtol=0)


def test_mlp_equals_fused_mlp_torch():
    torch.manual_seed(0)
    plain = Mlp(D, 50, activation="gelu_approx")
    fused = FusedMLP(D, 50, activation="gelu_approx", backend="torch")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, D)
    expected = plain.fc2(F.gelu(plain.fc1(x), approximate="tanh"))
    torch.testing.assert_close(plain(x), expected)
    torch.testing.assert_close(fused(x), expected, atol=1e-6, rtol=1e-5)


def test_embeddings():
    torch.manual_seed(0)
    emb = GPT2Embeddings(D, 50, 16)
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(emb(ids), emb.wte.weight[ids] + emb.wpe.weight[:9])
    positions = torch.arange(3, 12)
    torch.testing.assert_close(emb(ids, positions), emb.wte.weight[ids] + emb.wpe.weight[3:12])
    assert GPT2Embeddings(D, 50, 0).wpe is None
    with pytest.raises(TypeError, match="int32/int64"):
        emb(ids.float())
