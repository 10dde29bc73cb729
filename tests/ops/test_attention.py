"""flash_attn_func on the Triton kernels (interpreter on CPU) and on the torch backend, against
an fp64 reference with the official criterion (see attention_testing.py)."""

import itertools

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flash_attn.ops.attention.reference import attention_ref
from tests.ops.attention_testing import (
    BACKENDS,
    assert_within_criterion,
    compare,
    device_and_dtypes,
    forward_backward,
    make_inputs,
)
from tests.testing import HAS_CUDA, INTERPRET, kernel_device

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal): every seqlen, head-dim class
# and GQA ratio appears at least once; the product of all of them runs with -m slow.
CASES = [
    (2, 113, 113, 4, 4, 64, True),
    (1, 1, 257, 2, 1, 40, True),
    (3, 7, 128, 8, 1, 16, False),
    (1, 257, 113, 4, 2, 96, True),
    (2, 128, 7, 2, 2, 128, False),
    (1, 113, 257, 2, 1, 256, False),
    (1, 257, 257, 8, 4, 16, True),
    (2, 128, 1, 2, 2, 40, True),
]
SLOW_CASES = [
    (b, sq, sk, 8, 8 // g, d, c)
    for b, (sq, sk), g, d, c in itertools.product(
        [2],
        [(1, 1), (7, 113), (113, 7), (128, 128), (257, 113), (113, 257)],
        [1, 2, 8],
        [16, 40, 64, 96, 128, 256],
        [False, True],
    )
]


def check_against_reference(backend, case, dtype, device):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal = case
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    dout = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, device=device)

    def reference_at(precision):
        def run(q, k, v):
            return attention_ref(q.to(precision), k.to(precision), v.to(precision), causal=causal)[
                0
            ]

        return run

    def ours(q, k, v):
        out = flash_attn_func(q, k, v, causal=causal, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype
        return out

    compare(ours, reference_at, (q, k, v), dout, dtype, f"{backend} {case} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", CASES + [pytest.param(case, marks=pytest.mark.slow) for case in SLOW_CASES], ids=str
)
def test_matches_reference(backend, case):
    device, dtypes = device_and_dtypes(backend)
    for dtype in dtypes:
        check_against_reference(backend, case, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero_with_finite_gradients(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = make_inputs(2, 9, 4, 2, 2, 16, torch.float32, device)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend)
    out.sum().backward()
    # Bottom-right alignment: the first 9 - 4 queries see no key.
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isinf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :5], torch.zeros_like(q.grad[:, :5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_variants_match_unpacked(backend):
    device, _ = device_and_dtypes(backend)
    qkv = torch.randn(2, 33, 3, 4, 32, device=device, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True, backend=backend)
    out.sum().backward()
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    expected = flash_attn_func(q, k, v, causal=True, backend=backend)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))

    q = torch.randn(2, 17, 4, 32, device=device)
    kv = torch.randn(2, 29, 2, 2, 32, device=device)
    torch.testing.assert_close(
        flash_attn_kvpacked_func(q, kv, backend=backend),
        flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], backend=backend),
        rtol=0,
        atol=0,
    )


def test_backends_agree_on_probabilities_and_lse():
    q, k, v = make_inputs(1, 37, 53, 4, 2, 24, torch.float32, kernel_device())
    out_t, lse_t, probs_t = flash_attn_func(
        q, k, v, causal=True, return_attn_probs=True, backend="triton"
    )
    out_r, lse_r, probs_r = flash_attn_func(
        q.cpu(), k.cpu(), v.cpu(), causal=True, return_attn_probs=True, backend="torch"
    )
    torch.testing.assert_close(lse_t.cpu(), lse_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs_t.cpu(), probs_r, rtol=1e-5, atol=1e-6)
    assert probs_t.shape == (1, 4, 37, 53)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = make_inputs(1, 20, 30, 2, 2, 32, torch.float32, device)
    ours = flash_attn_func(q, k, v, softmax_scale=0.3, backend=backend)
    ref = attention_ref(q.double(), k.double(), v.double(), softmax_scale=0.3)[0]
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_within_statistical_bounds(backend):
    device, _ = device_and_dtypes(backend)
    p = 0.17
    q, k, v = make_inputs(2, 128, 96, 4, 4, 16, torch.float32, device)
    _, _, probs = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, backend=backend)
    n = probs.numel()
    dropped = (probs < 0).sum().item() / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma, f"dropped {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_under_a_seed(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = make_inputs(1, 40, 40, 2, 2, 16, torch.float32, device)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(flash_attn_func(q, k, v, dropout_p=0.3, causal=True, backend=backend))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_gradients_consistent_with_returned_mask(backend, dtype):
    """The kernel's own mask (read back from S_dmask) fed to the reference gives its gradients."""
    device, _ = device_and_dtypes(backend)
    p = 0.25
    case = (2, 57, 71, 4, 2, 32, True)
    keep = {}

    def ours(q, k, v):
        out, _, probs = flash_attn_func(
            q, k, v, dropout_p=p, causal=True, return_attn_probs=True, backend=backend
        )
        # A kept weight is stored as itself (>= 0), a dropped one negated (< 0).
        keep["mask"] = probs.detach().cpu() >= 0
        return out

    torch.manual_seed(3)
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, _ = case
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    dout = torch.randn_like(q)
    ours_out = forward_backward(ours, (q, k, v), dout)
    mask = keep["mask"].to(device)

    def reference_at(precision):
        def run(q, k, v):
            q, k, v = (t.to(precision) for t in (q, k, v))
            return attention_ref(q, k, v, causal=True, dropout_p=p, dropout_keep=mask)[0]

        return run

    ref = forward_backward(reference_at(torch.float64), (q, k, v), dout.double())
    plain = forward_backward(reference_at(dtype), (q, k, v), dout)
    for name, o, r, pl in zip(["out", "dq", "dk", "dv"], ours_out, ref, plain):
        assert_within_criterion(o, r, pl, dtype, f"dropout {backend} {dtype} {name}")


def test_triton_backward_is_bit_reproducible():
    q, k, v = make_inputs(2, 70, 90, 4, 2, 32, torch.float16, kernel_device())
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        torch.manual_seed(11)
        grads.append(
            forward_backward(
                lambda q, k, v: flash_attn_func(
                    q, k, v, dropout_p=0.1, causal=True, deterministic=True, backend="triton"
                ),
                (q, k, v),
                dout,
            )
        )
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device, _ = device_and_dtypes(backend)
    torch._dynamo.reset()

    def layer(q, k, v):
        return flash_attn_func(q * 2.0, k, v, dropout_p=0.0, causal=True, backend=backend).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q, k, v = make_inputs(1, 19, 23, 2, 1, 16, torch.float32, device)
    eager_grads = torch.autograd.grad(layer(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_ops_schema_names_the_options_in_their_order():
    """The custom ops take AttentionOptions' fields last, by position: the written-out schema
    must name them in the dataclass's order, with the types of their defaults."""
    import dataclasses

    from flash_attn.ops.attention.function import OPTIONS_SCHEMA
    from flash_attn.ops.attention.options import AttentionOptions

    declared = [arg.rsplit(" ", 1) for arg in OPTIONS_SCHEMA.split(", ")]
    fields = dataclasses.fields(AttentionOptions)
    assert [name for _, name in declared] == [f.name for f in fields]
    schema_types = {"float": float, "bool": bool, "SymInt": int}
    opts = AttentionOptions(0.5)
    assert [schema_types[t] for t, _ in declared] == [type(v) for v in opts.values()]


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="compiled kernels need a GPU")
def test_bfloat16_on_gpu():
    for case in CASES:
        check_against_reference("triton", case, torch.bfloat16, "cuda")
