"""Varlen, bias and masks, ALiBi, sliding window and softcap, on both backends, forward and
backward, against the fp64 reference with the official criterion."""

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func
from flash_attn.bert_padding import pad_input, unpad_input
from flash_attn.ops.attention.reference import alibi_bias, attention_ref, window_allowed
from tests.ops.attention_testing import (
    BACKENDS,
    compare,
    device_and_dtypes,
    forward_backward,
    make_inputs,
)

DTYPES = [torch.float32, torch.float16]


def _check(
    backend, dtype, shape, options, reference_options=None, extra=(), name="", bias_for_ours=True
):
    """flash_attn_func(q, k, v, **options) vs attention_ref(**reference_options); extra holds
    an attn_bias given to the reference, and to ours when bias_for_ours."""
    device, _ = device_and_dtypes(backend)
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    q, k, v = make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    extra = [t.to(device) for t in extra]
    dout = torch.randn_like(q)
    reference_options = reference_options if reference_options is not None else options
    bias_key = "attn_bias" if extra else None

    def ours(q, k, v, *extra):
        kwargs = dict(options, **({bias_key: extra[0]} if extra and bias_for_ours else {}))
        return flash_attn_func(q, k, v, backend=backend, **kwargs)

    def reference_at(precision):
        def run(q, k, v, *extra):
            kwargs = dict(reference_options)
            if extra:
                bias = extra[0]
                kwargs[bias_key] = bias if bias.dtype == torch.bool else bias.to(precision)
            q, k, v = (t.to(precision) for t in (q, k, v))
            return attention_ref(q, k, v, **kwargs)[0]

        return run

    compare(ours, reference_at, (q, k, v, *extra), dout, dtype, f"{name} {backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", [(2, 4, 37, 61), (1, 1, 37, 61), (4, 1, 61), (61,)])
def test_additive_bias_and_its_gradient(backend, dtype, bias_shape):
    bias = torch.randn(bias_shape, dtype=dtype).requires_grad_()
    _check(
        backend,
        dtype,
        (2, 37, 61, 4, 2, 32),
        dict(causal=True),
        extra=[bias],
        name=f"bias {bias_shape}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_boolean_mask_with_fully_masked_rows(backend, dtype):
    mask = torch.rand(2, 1, 45, 70) > 0.6
    mask[:, :, :3] = False  # rows that may attend to nothing
    _check(backend, dtype, (2, 45, 70, 2, 2, 24), {}, extra=[mask], name="bool mask")
    device, _ = device_and_dtypes(backend)
    q, k, v = make_inputs(2, 45, 70, 2, 2, 24, dtype, device)
    out = flash_attn_func(q, k, v, attn_bias=mask.to(device), backend=backend)
    out.float().sum().backward()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_equals_explicit_bias(backend, slopes_shape, causal):
    slopes = torch.rand(slopes_shape) * 0.5
    device, _ = device_and_dtypes(backend)
    slopes = slopes.to(device)
    shape = (2, 29, 53, 4, 1, 16)
    _check(backend, torch.float32, shape, dict(alibi_slopes=slopes, causal=causal), name="alibi")
    q, k, v = make_inputs(*shape, torch.float32, device)
    explicit = alibi_bias(slopes, 29, 53)
    torch.testing.assert_close(
        flash_attn_func(q, k, v, alibi_slopes=slopes, causal=causal, backend=backend),
        flash_attn_func(q, k, v, attn_bias=explicit, causal=causal, backend=backend),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "window,causal",
    [((8, 3), False), ((20, -1), False), ((-1, 5), False), ((10, 0), True), ((0, 0), False)],
)
def test_sliding_window_equals_band_mask(backend, dtype, window, causal):
    shape = (2, 97, 113, 2, 1, 32)
    band = window_allowed(97, 113, causal, window)
    _check(
        backend,
        dtype,
        shape,
        dict(window_size=window, causal=causal),
        reference_options={},
        extra=[band],
        name=f"window {window}",
        bias_for_ours=False,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(backend, dtype):
    _check(backend, dtype, (2, 33, 47, 4, 2, 40), dict(softcap=2.5, causal=True), name="softcap")


@pytest.mark.parametrize("causal", [False, True])
def test_large_softcap_in_fp32_without_tolerance(causal):
    """With softcap = 30 the scores / softcap are near 0, where tanh must keep its relative
    precision (2 sigmoid(2x) - 1 gave 2 to 4.6 times plain PyTorch's error here): the fp32
    output within the 2x criterion with no atol to hide behind."""
    device, _ = device_and_dtypes("triton")
    q, k, v = (t.detach() for t in make_inputs(1, 64, 64, 2, 2, 64, torch.float32, device))
    ours = flash_attn_func(q, k, v, causal=causal, softcap=30.0, backend="triton")
    exact = attention_ref(q.double(), k.double(), v.double(), None, causal, softcap=30.0)[0]
    plain = attention_ref(q, k, v, None, causal, softcap=30.0)[0]
    error, plain_error = ((t.double() - exact).abs().max().item() for t in (ours, plain))
    assert error <= 2 * plain_error, f"error {error:.3g} > 2 x plain PyTorch's {plain_error:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_at_once(backend):
    bias = torch.randn(1, 4, 64, 80).requires_grad_()
    slopes = torch.rand(4)
    _check(
        backend,
        torch.float32,
        (2, 64, 80, 4, 2, 16),
        dict(causal=True, window_size=(30, -1), softcap=4.0, alibi_slopes=slopes),
        extra=[bias],
        name="combined",
    )


# ---------------------------------------------------------------------------------------------
# Variable-length batches


def _packed_batch(lengths_q, lengths_k, nheads, nheads_k, headdim, dtype, device):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), nheads, headdim, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), nheads_k, headdim, dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), nheads_k, headdim, dtype=dtype, device=device)
    return [t.requires_grad_() for t in (q, k, v)], cu_q.to(device), cu_k.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_each_sequence_alone(backend, dtype, causal):
    device, _ = device_and_dtypes(backend)
    lengths_q, lengths_k = [1, 70, 33, 128], [7, 70, 90, 1]
    # Two query heads on one key head (GQA); each head is attended alike.
    (q, k, v), cu_q, cu_k = _packed_batch(lengths_q, lengths_k, 2, 1, 24, dtype, device)
    dout = torch.randn_like(q)
    slopes = torch.rand(4, 2, device=device)
    options = dict(causal=causal, window_size=(40, -1), alibi_slopes=slopes)
    packed = forward_backward(
        lambda q, k, v: flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 128, 90, backend=backend, **options
        ),
        (q, k, v),
        dout,
    )
    for b in range(4):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        options_b = dict(options, alibi_slopes=slopes[b])
        alone = forward_backward(
            lambda q, k, v, options_b=options_b: flash_attn_func(
                q, k, v, backend=backend, **options_b
            ),
            (q[None, sq], k[None, sk], v[None, sk]),
            dout[None, sq],
        )
        atol = 1e-5 if dtype == torch.float32 else 2e-3
        for name, p, a in zip(["out", "dq", "dk", "dv"], packed, alone):
            rows = sq if name in ("out", "dq") else sk
            torch.testing.assert_close(p[rows], a[0], rtol=1e-3, atol=atol, msg=f"seq {b} {name}")


def _into_pages(packed, cu_seqlens, page_size, spare_pages=3):
    """A paged cache (num_pages, page_size, ...) holding the sequences of packed (total, ...),
    each in shuffled pages, unused slots NaN; and the (batch, max_pages) int32 block table."""
    lengths = cu_seqlens.diff().tolist()
    max_pages = -(-max(lengths) // page_size)
    num_pages = len(lengths) * max_pages + spare_pages
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0))
    table = order[: len(lengths) * max_pages].view(len(lengths), max_pages)
    cache = packed.new_full((num_pages, page_size, *packed.shape[1:]), float("nan"))
    for b, n in enumerate(lengths):
        positions = torch.arange(n)
        cache[table[b][positions // page_size], positions % page_size] = packed[
            cu_seqlens[b] : cu_seqlens[b] + n
        ].detach()
    return cache.to(packed.device), table.to(torch.int32).to(packed.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(20, 5), softcap=5.0)])
def test_paged_varlen_equals_packed_varlen(backend, options):
    """Paged prefill: k and v read through block_table give what the packed sequences give."""
    device, _ = device_and_dtypes(backend)
    (q, k, v), cu_q, cu_k = _packed_batch([1, 40, 17], [7, 70, 33], 4, 2, 16, torch.float32, device)
    k_pages, table = _into_pages(k, cu_k, page_size=16)
    v_pages, _ = _into_pages(v, cu_k, page_size=16)
    with torch.no_grad():
        expected = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 40, 70, return_attn_probs=True, backend=backend, **options
        )
        paged = flash_attn_varlen_func(
            q,
            k_pages,
            v_pages,
            cu_q,
            cu_k,
            40,
            70,
            return_attn_probs=True,
            block_table=table,
            backend=backend,
            **options,
        )
    for name, a, b in zip(["out", "lse", "probs"], paged, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    if backend == "torch":  # gradients flow into the pages
        out = flash_attn_varlen_func(
            q,
            k_pages.requires_grad_(),
            v_pages,
            cu_q,
            cu_k,
            40,
            70,
            block_table=table,
            backend=backend,
            **options,
        )
        out.sum().backward()
        packed_out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 70, backend=backend, **options)
        dk = torch.autograd.grad(packed_out.sum(), k)[0]
        dk_pages, _ = _into_pages(dk, cu_k, page_size=16)
        used = ~torch.isnan(dk_pages)
        torch.testing.assert_close(k_pages.grad[used], dk_pages[used], rtol=1e-5, atol=1e-6)
    else:  # the forward runs, as the official function's; a backward through the pages cannot
        q = q.detach().requires_grad_()
        out = flash_attn_varlen_func(
            q, k_pages, v_pages, cu_q, cu_k, 40, 70, block_table=table, backend=backend, **options
        )
        torch.testing.assert_close(out.detach(), paged[0], rtol=0, atol=0)
        with pytest.raises(ValueError, match="block_table: the triton backend"):
            out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_probs_and_lse_layout(backend):
    device, _ = device_and_dtypes(backend)
    (q, k, v), cu_q, cu_k = _packed_batch([5, 9], [6, 3], 2, 2, 16, torch.float32, device)
    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 9, 6, causal=True, return_attn_probs=True, backend=backend
    )
    assert out.shape == q.shape and lse.shape == (2, 14) and probs.shape == (2, 2, 9, 6)
    _, lse1, probs1 = flash_attn_func(
        q[None, 5:], k[None, 6:], v[None, 6:], causal=True, return_attn_probs=True, backend=backend
    )
    torch.testing.assert_close(lse[:, 5:].cpu(), lse1[0].cpu())
    torch.testing.assert_close(probs[1, :, :9, :3].cpu(), probs1[0].cpu())


def test_unpad_and_pad_round_trip():
    hidden = torch.randn(3, 10, 4, 8)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3, 6])[:, None]
    unpadded, indices, cu_seqlens, max_seqlen, used = unpad_input(hidden, mask)
    assert unpadded.shape == (19, 4, 8) and max_seqlen == 10
    assert cu_seqlens.tolist() == [0, 10, 13, 19] and cu_seqlens.dtype == torch.int32
    assert used.tolist() == [10, 3, 6]
    padded = pad_input(unpadded, indices, 3, 10)
    torch.testing.assert_close(padded, hidden * mask[:, :, None, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_through_varlen_matches_masked_attention(backend):
    device, _ = device_and_dtypes(backend)
    q, k, v = make_inputs(3, 20, 20, 2, 2, 16, torch.float32, device)
    lengths = torch.tensor([20, 4, 13])
    mask = (torch.arange(20)[None, :] < lengths[:, None]).to(device)
    (q_u, indices, cu, max_len, _), (k_u, *_), (v_u, *_) = (unpad_input(t, mask) for t in (q, k, v))
    out = pad_input(
        flash_attn_varlen_func(
            q_u, k_u, v_u, cu, cu, max_len, max_len, causal=True, backend=backend
        ),
        indices,
        3,
        20,
    )
    key_mask = mask[:, None, None, :]
    expected = (
        attention_ref(q.double(), k.double(), v.double(), causal=True, attn_bias=key_mask)[0]
        * mask[:, :, None, None]
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window,causal", [((100, 0), True), ((40, 70), False)])
def test_torch_backend_banded_path_for_long_sequences(window, causal):
    """Past one query chunk the torch backend only visits the keys in the window."""
    bias = torch.randn(1, 4, 600, 550).requires_grad_()
    options = dict(window_size=window, causal=causal, alibi_slopes=torch.rand(4))
    _check("torch", torch.float32, (1, 600, 550, 4, 2, 16), options, extra=[bias], name="banded")


def test_torch_compile_traces_bias_window_alibi_and_varlen_on_triton():
    device, _ = device_and_dtypes("triton")
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 40, 40, 2, 1, 16, torch.float32, device)
    bias = torch.randn(1, 2, 40, 40, device=device, requires_grad=True)
    slopes = torch.rand(2, device=device)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=device)

    def layer(q, k, v, bias):
        dense = flash_attn_func(
            q,
            k,
            v,
            causal=True,
            window_size=(9, 0),
            alibi_slopes=slopes,
            softcap=3.0,
            attn_bias=bias,
            backend="triton",
        )
        packed = flash_attn_varlen_func(
            q[0], k[0], v[0], cu, cu, 25, 25, causal=True, backend="triton"
        )
        return dense.sum() + packed.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(layer(q, k, v, bias), (q, k, v, bias))
    traced = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
