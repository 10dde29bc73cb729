"""Rotary embedding: kernel vs reference, varlen, offsets, in place, compile, module vs HF.

Criterion (DESIGN.md): error against an fp64 reference at most twice the error of plain
PyTorch (the rotation computed in the input dtype, as Hugging Face does), plus a tiny atol.
"""

import pytest
import torch

from flash_attn.modules.rotary import RotaryEmbedding
from flash_attn.ops.rotary import apply_rotary
from flash_attn.ops.rotary.reference import apply_rotary_ref
from tests.testing import DTYPES, assert_compiles_for_gpu, kernel_device

DEVICE = kernel_device()
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
BACKENDS = ["triton", "torch"]


def _tables(seqlen_ro, rotary_dim, base=10000.0, dtype=torch.float32):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    freqs = torch.outer(torch.arange(seqlen_ro, dtype=torch.float64), inv_freq)
    return freqs.cos().to(DEVICE, dtype), freqs.sin().to(DEVICE, dtype)


def _plain(x, cos, sin, offsets, interleaved, conjugate=False):
    """The rotation in x's dtype (cos/sin rounded to it): the error baseline."""
    batch, seqlen = x.shape[:2]
    rotary_dim = 2 * cos.shape[1]
    pos = torch.arange(seqlen, device=x.device)[None] + (
        offsets.long()[:, None] if isinstance(offsets, torch.Tensor) else offsets
    )
    c = cos.to(x.dtype)[pos].unsqueeze(2)
    s = sin.to(x.dtype)[pos].unsqueeze(2) * (-1 if conjugate else 1)
    rot = x[..., :rotary_dim]
    x0, x1 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, -1)
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    rot = torch.stack((o0, o1), -1).flatten(-2) if interleaved else torch.cat((o0, o1), -1)
    return torch.cat((rot, x[..., rotary_dim:]), -1)


def _check(name, got, plain, oracle, dtype):
    oracle = oracle.double()
    err = (got.double() - oracle).abs().max().item()
    base = (plain.double() - oracle).abs().max().item()
    atol = ATOL[dtype] * max(1.0, oracle.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 * plain {base:.3g} + {atol:.3g}"


def _value_and_grad(fn, x, dout):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, x, dout)
    return out, dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
@pytest.mark.parametrize(
    "batch, seqlen, nheads, headdim, rotary_dim",
    [(1, 1, 1, 2, 2), (3, 7, 2, 10, 6), (2, 113, 3, 64, 64), (2, 33, 1, 128, 32)],
)
def test_matches_reference(
    backend, dtype, interleaved, offsets, batch, seqlen, nheads, headdim, rotary_dim
):
    if offsets == "zero":
        seqlen_offsets = 0
    elif offsets == "int":
        seqlen_offsets = 5
    else:
        seqlen_offsets = torch.randint(0, 20, (batch,), dtype=torch.int32, device=DEVICE)
    cos, sin = _tables(seqlen + 20, rotary_dim)
    x = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype, device=DEVICE)
    dout = torch.randn_like(x)

    def fused(x):
        return apply_rotary(x, cos, sin, seqlen_offsets, interleaved=interleaved, backend=backend)

    out, dx = _value_and_grad(fused, x, dout)
    out_ref, dx_ref = _value_and_grad(
        lambda x: apply_rotary_ref(
            x, cos.double(), sin.double(), seqlen_offsets, interleaved=interleaved
        ),
        x.double(),
        dout.double(),
    )
    out_pl, dx_pl = _value_and_grad(
        lambda x: _plain(x, cos, sin, seqlen_offsets, interleaved), x, dout
    )
    assert out.dtype == dtype and out.shape == x.shape and dx.dtype == dtype
    _check("out", out, out_pl, out_ref, dtype)
    _check("dx", dx, dx_pl, dx_ref, dtype)
    # Features past rotary_dim pass through untouched.
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert torch.equal(dx[..., rotary_dim:], dout[..., rotary_dim:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tensor_offsets", [False, True])
def test_varlen_matches_per_sequence(backend, interleaved, tensor_offsets):
    lengths = [5, 0, 13, 1]
    cu_seqlens = torch.tensor([0, 5, 5, 18, 19], dtype=torch.int32, device=DEVICE)
    nheads, headdim, rotary_dim = 3, 12, 8
    offsets = [2, 0, 7, 30]
    seqlen_offsets = (
        torch.tensor(offsets, dtype=torch.int32, device=DEVICE) if tensor_offsets else 4
    )
    cos, sin = _tables(40, rotary_dim)
    x = torch.randn(19, nheads, headdim, device=DEVICE)
    dout = torch.randn_like(x)
    out, dx = _value_and_grad(
        lambda x: apply_rotary(
            x,
            cos,
            sin,
            seqlen_offsets,
            cu_seqlens,
            max(lengths),
            interleaved=interleaved,
            backend=backend,
        ),
        x,
        dout,
    )
    start = 0
    for b, length in enumerate(lengths):
        sl = slice(start, start + length)
        offset = offsets[b] if tensor_offsets else 4
        # (length, H, D) -> (1, length, H, D): one dense sequence
        exp, exp_dx = _value_and_grad(
            lambda x, offset=offset: apply_rotary_ref(x, cos, sin, offset, interleaved=interleaved),
            x[None, sl],
            dout[None, sl],
        )
        torch.testing.assert_close(out[sl], exp[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dx[sl], exp_dx[0], atol=1e-6, rtol=1e-6)
        start += length


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_and_conjugate(backend, interleaved):
    cos, sin = _tables(30, 8)
    x = torch.randn(2, 9, 3, 10, device=DEVICE)
    expected = apply_rotary(x, cos, sin, 3, interleaved=interleaved, backend=backend)
    y = x.clone()
    returned = apply_rotary(y, cos, sin, 3, interleaved=interleaved, inplace=True, backend=backend)
    assert returned is y
    torch.testing.assert_close(y, expected)
    # Conjugate rotation undoes the rotation.
    back = apply_rotary(y, cos, sin, 3, interleaved=interleaved, conjugate=True, backend=backend)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    conj_ref = apply_rotary_ref(x, cos, sin, 3, interleaved=interleaved, conjugate=True)
    torch.testing.assert_close(
        apply_rotary(x, cos, sin, 3, interleaved=interleaved, conjugate=True, backend=backend),
        conj_ref,
    )
    # Gradient through the in-place op on a non-leaf.
    leaf = x.clone().requires_grad_()
    dout = torch.randn_like(x)
    out = apply_rotary(
        leaf * 1.0, cos, sin, 3, interleaved=interleaved, inplace=True, backend=backend
    )
    (dx,) = torch.autograd.grad(out, leaf, dout)
    _, dx_ref = _value_and_grad(
        lambda t: apply_rotary_ref(t, cos, sin, 3, interleaved=interleaved), x, dout
    )
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_inplace_on_a_leaf_that_requires_grad(backend, varlen):
    """As flash-attn 2.x allows: the leaf's values are overwritten and its .grad is the
    rotated-back upstream gradient."""
    cos, sin = _tables(12, 8)
    x = torch.randn(2, 5, 3, 10, device=DEVICE)
    varlen_args = {}
    if varlen:
        x = x.flatten(0, 1)
        cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
        varlen_args = dict(cu_seqlens=cu_seqlens, max_seqlen=6)
    expected = apply_rotary_ref(x, cos, sin, 1, **varlen_args)
    dout = torch.randn_like(x)
    _, dx_ref = _value_and_grad(lambda t: apply_rotary_ref(t, cos, sin, 1, **varlen_args), x, dout)
    leaf = x.clone().requires_grad_()
    out = apply_rotary(leaf, cos, sin, 1, inplace=True, backend=backend, **varlen_args)
    torch.testing.assert_close(leaf.detach(), expected)
    torch.testing.assert_close(out.detach(), expected)
    out.backward(dout)
    torch.testing.assert_close(leaf.grad, dx_ref)


def test_strided_input():
    """q as a slice of a packed qkv tensor (rows not contiguous)."""
    cos, sin = _tables(20, 16)
    qkv = torch.randn(2, 11, 3, 4, 16, device=DEVICE)
    q = qkv[:, :, 0]
    out = apply_rotary(q, cos, sin, backend="triton")
    torch.testing.assert_close(out, apply_rotary_ref(q, cos, sin))
    q2 = qkv.clone()[:, :, 0]
    apply_rotary(q2, cos, sin, inplace=True, backend="triton")
    torch.testing.assert_close(q2, out)


def _misaligned(t):
    """A copy of t one element into a fresh buffer: contiguous, not 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    assert view.data_ptr() % 16 != 0
    return view.copy_(t)


@pytest.mark.parametrize("layout", ["qkv_slice", "last_dim_strided"])
def test_strided_input_forward_and_backward_in_repeated_calls(layout):
    """x read through its strides (a slice of qkv) or copied (a non-unit last stride), and a
    backward whose gradient is a non-contiguous then a misaligned view: every call of the
    signature, the first (which builds the launches) and later ones, matches the reference."""
    cos, sin = _tables(20, 16)
    for _ in range(3):
        if layout == "qkv_slice":
            qkv = torch.randn(2, 11, 3, 4, 16, device=DEVICE)
            x = qkv[:, :, 1]
        else:
            x = torch.randn(2, 11, 4, 32, device=DEVICE)[..., ::2]
        x.requires_grad_()
        out = apply_rotary(x, cos, sin, 2, backend="triton")
        torch.testing.assert_close(out, apply_rotary_ref(x.detach(), cos, sin, 2))
        for dout in (
            torch.randn(2, 4, 11, 16, device=DEVICE).transpose(1, 2),
            _misaligned(torch.randn(2, 11, 4, 16, device=DEVICE)),
        ):
            (dx,) = torch.autograd.grad(out, x, dout, retain_graph=True)
            _, dx_ref = _value_and_grad(lambda t: apply_rotary_ref(t, cos, sin, 2), x, dout)
            torch.testing.assert_close(dx, dx_ref)


def test_partial_rotary_dim_without_grad():
    """rotary_dim < headdim (the tail copied), out of place without autograd, twice."""
    cos, sin = _tables(12, 6)
    for _ in range(2):
        x = torch.randn(2, 5, 3, 10, device=DEVICE)
        with torch.no_grad():
            out = apply_rotary(x, cos, sin, interleaved=True, backend="triton")
        torch.testing.assert_close(out, apply_rotary_ref(x, cos, sin, interleaved=True))


def test_torch_compile_traces_the_triton_path():
    cos, sin = _tables(40, 8)
    offsets = torch.tensor([1, 4], dtype=torch.int32, device=DEVICE)

    def f(q, k):
        return apply_rotary(q, cos, sin, 3, backend="triton") * apply_rotary(
            k, cos, sin, offsets, interleaved=True, backend="triton"
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q = torch.randn(2, 13, 2, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 13, 2, 8, device=DEVICE, requires_grad=True)
    out = compiled(q, k)
    grads = torch.autograd.grad(out.sum(), (q, k))
    out_ref = f(q, k)
    grads_ref = torch.autograd.grad(out_ref.sum(), (q, k))
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


HF_SCALINGS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 2.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", HF_SCALINGS, ids=lambda s: s["rope_type"])
@pytest.mark.parametrize("seqlen", [7, 45])
def test_module_matches_hugging_face(backend, scaling, seqlen):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    head_dim, max_pos, theta = 16, 32, 500.0
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    hf_rotary = LlamaRotaryEmbedding(config)
    q = torch.randn(2, seqlen, 4, head_dim, device=DEVICE)
    k = torch.randn(2, seqlen, 2, head_dim, device=DEVICE)
    position_ids = torch.arange(seqlen)[None].expand(2, seqlen)
    cos, sin = hf_rotary(q, position_ids)
    # HF layout (B, H, S, D) <-> ours (B, S, H, D)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    ours = RotaryEmbedding(
        head_dim,
        base=theta,
        scaling=scaling,
        max_position_embeddings=max_pos,
        backend=backend,
        device=DEVICE,
    )
    assert ours.state_dict() == {}
    q_rot, k_rot = ours(q, k)
    torch.testing.assert_close(q_rot, q_hf.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot, k_hf.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_decoding_offsets(backend):
    """Rotating a suffix at its offset equals the suffix of the full rotation."""
    rotary = RotaryEmbedding(8, interleaved=True, backend=backend, device=DEVICE)
    q = torch.randn(2, 20, 3, 12, device=DEVICE)
    k = torch.randn(2, 20, 1, 12, device=DEVICE)
    q_full, k_full = rotary(q[:, :4], k[:, :4])  # a short first call: the cache must grow
    q_full, k_full = rotary(q, k)
    q_step, k_step = rotary(q[:, 15:16], k[:, 15:16], seqlen_offset=15)
    torch.testing.assert_close(q_step, q_full[:, 15:16])
    torch.testing.assert_close(k_step, k_full[:, 15:16])
    # Per-sequence offsets: sequence b's token sits at position offsets[b].
    offsets = torch.tensor([3, 19], dtype=torch.int32, device=DEVICE)
    q_b, _ = rotary(q[:, :1], None, seqlen_offset=offsets, max_seqlen=20)
    full, _ = rotary(q[:, [0]].expand(2, 20, 3, 12).contiguous())
    torch.testing.assert_close(q_b[0, 0], full[0, 3])
    torch.testing.assert_close(q_b[1, 0], full[1, 19])
    # Partial rotary: features past dim are untouched.
    assert torch.equal(q_full[..., 8:], q[..., 8:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    cos, sin = _tables(16, 8)
    x = torch.randn(2, 10, 3, 8, device=DEVICE)

    def call(*args, **kwargs):
        return apply_rotary(*args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match="batch, seqlen, nheads, headdim"):
        call(x[0], cos, sin)
    with pytest.raises(ValueError, match="rotary_dim"):
        call(torch.randn(2, 10, 3, 6, device=DEVICE), cos, sin)
    with pytest.raises(ValueError, match="same shape"):
        call(x, cos, sin[:, :2])
    with pytest.raises(ValueError, match="cos/sin cover 16 positions"):
        call(x, cos, sin, seqlen_offsets=7)
    with pytest.raises(ValueError, match="cos/sin cover 16 positions"):
        call(x, cos, sin, seqlen_offsets=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seqlen_offsets"):
        call(x, cos, sin, seqlen_offsets=-1)
    with pytest.raises(ValueError, match="seqlen_offsets"):
        call(x, cos, sin, seqlen_offsets=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="seqlen_offsets"):
        call(x, cos, sin, seqlen_offsets=1.5)
    packed = torch.randn(10, 3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens"):
        call(packed, cos, sin, cu_seqlens=torch.tensor([0, 10], device=DEVICE), max_seqlen=10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="max_seqlen"):
        call(packed, cos, sin, cu_seqlens=cu)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="max_seqlen"):
            call(packed, cos, sin, cu_seqlens=cu, max_seqlen=5)
        with pytest.raises(ValueError, match="total_seqlen"):
            call(packed, cos, sin, cu_seqlens=cu[:2], max_seqlen=6)
    with pytest.raises(TypeError, match="x"):
        call(x.long(), cos, sin)


def test_module_bad_config():
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(8, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        RotaryEmbedding(8, scaling={"type": "linear"})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RotaryEmbedding(8, scaling={"rope_type": "dynamic", "factor": 2.0})


def test_torch_compile_varlen():
    cos, sin = _tables(40, 8)
    cu_seqlens = torch.tensor([0, 6, 17], dtype=torch.int32, device=DEVICE)

    def f(x):
        return apply_rotary(x, cos, sin, 2, cu_seqlens, 11, backend="triton")

    x = torch.randn(17, 2, 8, device=DEVICE, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    out_ref, dx_ref = _value_and_grad(
        lambda t: apply_rotary_ref(t, cos, sin, 2, cu_seqlens), x, 2 * out.detach()
    )
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, dx_ref)


_COMPILE_FOR_SM90 = """
from flash_attn.ops.rotary.triton.kernels import _rotary_kernel
from benchmarks.triton_compile import compile_for_gpu

types = dict(X="*fp16", Out="*fp16", Cos="*fp32", Sin="*fp32", SeqlenOffsets="*i32",
             CuSeqlens="*i32", stride_xb="i64", stride_xm="i64", stride_xh="i64",
             stride_ob="i64", stride_om="i64", stride_oh="i64", seqlen="i32",
             seqlen_offset="i32", seqlen_ro="i32", rotary_dim_half="i32")
for interleaved, varlen in ((False, False), (True, True)):
    compile_for_gpu(_rotary_kernel, types, dict(
        INTERLEAVED=interleaved, CONJUGATE=varlen, IS_VARLEN=varlen, IS_OFFSETS_TENSOR=varlen,
        BLOCK_M=16, BLOCK_K=32))
print("compiled")
"""


def test_kernel_compiles_for_gpu():
    """The interpreter accepts code the compiler rejects: compile to sm_90 (no GPU needed)."""
    assert_compiles_for_gpu(_COMPILE_FOR_SM90, timeout=300)
