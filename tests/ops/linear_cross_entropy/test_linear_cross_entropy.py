"""Chunked LM head + cross-entropy against the full-logits oracle and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flash_attn.modules.losses import LinearCrossEntropyLoss
from flash_attn.ops.linear_cross_entropy import linear_cross_entropy
from flash_attn.ops.linear_cross_entropy.reference import linear_cross_entropy_ref
from tests.testing import HAS_CUDA, kernel_device

BACKENDS = ["triton", "torch"]


def _device(backend):
    return kernel_device() if backend == "triton" else "cpu"


def _inputs(n_tokens, hidden_dim, vocab, dtype, device, bias=True, n_ignored=0):
    hidden = torch.randn(n_tokens, hidden_dim)
    weight = torch.randn(vocab, hidden_dim) * hidden_dim**-0.5 * 2
    b = torch.randn(vocab) if bias else None
    labels = torch.randint(0, vocab, (n_tokens,))
    labels[:n_ignored] = -100
    tensors = [t if t is None else t.to(dtype=dtype, device=device) for t in (hidden, weight, b)]
    return tensors, labels.to(device)


def _run(fn, tensors, labels, grad_scale=1.0, **kw):
    """Loss and the gradients of (hidden, weight, bias) for a weighted sum of the loss."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * weights * grad_scale).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def _errs(got, ref):
    return [(a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(got, ref)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "n_tokens, hidden_dim, vocab, chunk_size",
    [(13, 7, 1, 4), (13, 1, 7, 5), (21, 65, 1000, None), (9, 16, 257, 1), (3, 8, 50257, 2)],
)
def test_within_twice_plain_pytorch_error(
    backend, dtype, reduction, n_tokens, hidden_dim, vocab, chunk_size
):
    device = _device(backend)
    tensors, labels = _inputs(n_tokens, hidden_dim, vocab, dtype, device, n_ignored=2)
    opts = dict(label_smoothing=0.1, lse_square_scale=1e-3, reduction=reduction)
    got = _run(
        linear_cross_entropy, tensors, labels, chunk_size=chunk_size, backend=backend, **opts
    )
    oracle = _run(linear_cross_entropy_ref, [t.double() for t in tensors], labels, **opts)
    plain = _run(linear_cross_entropy_ref, tensors, labels, **opts)
    # Both paths accumulate in fp32, and the order of a sum of n terms differs between CPUs
    # (vector widths): its rounding error grows like sqrt(n) * eps(fp32). n is the length of the
    # sum behind each output: the vocab for the loss (lse) and hidden (dlogits @ weight), the
    # tokens for the weight and bias gradients.
    lengths = dict(loss=vocab, hidden=vocab, weight=n_tokens, bias=n_tokens)
    base_atol = 1e-6 if dtype == torch.float32 else 2e-3
    for name, err, budget in zip(lengths, _errs(got, oracle), _errs(plain, oracle)):
        atol = base_atol + torch.finfo(torch.float32).eps * lengths[name] ** 0.5
        assert err <= 2 * budget + atol, name
    assert [g.shape for g in got[1:]] == [t.shape for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_within_twice_plain_pytorch_error(backend, dtype, reduction):
    """softcap * tanh(logits / softcap) before the loss (Gemma 2), forward and backward; the
    logits here reach about 4 standard deviations of 2, so a cap of 1.5 bends most of them."""
    device = _device(backend)
    n_tokens, vocab = 11, 257
    tensors, labels = _inputs(n_tokens, 16, vocab, dtype, device, n_ignored=2)
    opts = dict(reduction=reduction, softcap=1.5, label_smoothing=0.1)
    got = _run(linear_cross_entropy, tensors, labels, chunk_size=4, backend=backend, **opts)
    oracle = _run(linear_cross_entropy_ref, [t.double() for t in tensors], labels, **opts)
    plain = _run(linear_cross_entropy_ref, tensors, labels, **opts)
    uncapped = _run(
        linear_cross_entropy_ref,
        [t.double() for t in tensors],
        labels,
        reduction=reduction,
        label_smoothing=0.1,
    )
    assert (uncapped[0] - oracle[0]).abs().max() > 0.1  # the cap changes the loss
    # As in test_within_twice_plain_pytorch_error: sums of n fp32 terms in another order.
    lengths = dict(loss=vocab, hidden=vocab, weight=n_tokens, bias=n_tokens)
    base_atol = 1e-6 if dtype == torch.float32 else 2e-3
    for name, err, budget in zip(lengths, _errs(got, oracle), _errs(plain, oracle)):
        atol = base_atol + torch.finfo(torch.float32).eps * lengths[name] ** 0.5
        assert err <= 2 * budget + atol, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_matches_lm_head_plus_f_cross_entropy(backend, reduction, eps):
    device = _device(backend)
    vocab = 130
    tensors, labels = _inputs(17, 24, vocab, torch.float32, device, n_ignored=3)

    def plain(hidden, weight, labels, bias, **kw):
        return F.cross_entropy(F.linear(hidden, weight, bias), labels, **kw)

    kw = dict(label_smoothing=eps, reduction=reduction)
    got = _run(linear_cross_entropy, tensors, labels, chunk_size=6, backend=backend, **kw)
    ref = _run(plain, tensors, labels, **kw)
    # The loss and hidden's gradient sum over the vocab in fp32, in an order that differs between
    # the paths: an error growing like sqrt(vocab) * eps.
    atol = 1e-6 + torch.finfo(torch.float32).eps * vocab**0.5
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_misaligned_chunks_in_repeated_calls(reduction):
    """Chunks of 5 tokens (labels and per-token gradients sliced off 16-byte boundaries, a
    shorter last chunk: two chunk shapes) and, for reduction="none", a non-contiguous upstream
    gradient: every call, the first (which builds the chunk launches) and later ones, matches
    the full-logits oracle."""
    device = kernel_device()
    for _ in range(3):
        tensors, labels = _inputs(13, 8, 40, torch.float32, device, n_ignored=2)
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        loss = linear_cross_entropy(
            leaves[0],
            leaves[1],
            labels,
            leaves[2],
            reduction=reduction,
            chunk_size=5,
            backend="triton",
        )
        dloss = torch.linspace(0.5, 1.5, 26, device=device)[::2] if reduction == "none" else None
        grads = torch.autograd.grad(loss, leaves, dloss)
        refs = [t.detach().clone().requires_grad_() for t in tensors]
        ref = linear_cross_entropy_ref(refs[0], refs[1], labels, refs[2], reduction=reduction)
        ref_grads = torch.autograd.grad(ref, refs, dloss)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_frozen_weight_no_bias(backend):
    device = _device(backend)
    (hidden, weight, _), labels = _inputs(10, 12, 50, torch.float32, device, bias=False)
    weight.requires_grad_(False)
    h = hidden.clone().requires_grad_()
    (3.0 * linear_cross_entropy(h, weight, labels, chunk_size=3, backend=backend)).backward()
    h_ref = hidden.clone().requires_grad_()
    (3.0 * F.cross_entropy(h_ref @ weight.t(), labels)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_module(backend):
    device = _device(backend)
    (hidden, weight, bias), labels = _inputs(12, 8, 40, torch.float32, device)
    hidden, labels = hidden.reshape(3, 4, 8), labels.reshape(3, 4)
    module = LinearCrossEntropyLoss(reduction="none", chunk_size=5, backend=backend)
    got = module(hidden, weight, labels, bias)
    assert got.shape == (3, 4)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).reshape(12, 40), labels.reshape(12))
    torch.testing.assert_close(got.mean(), ref)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op allocates while active (views do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [
            a
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        ]
        storages = {a.untyped_storage().data_ptr() for a in flat_in}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_chunk_of_logits_is_allocated(backend):
    device = _device(backend)
    n_tokens, hidden_dim, vocab, chunk = 64, 8, 300, 8
    (hidden, weight, bias), labels = _inputs(n_tokens, hidden_dim, vocab, torch.float32, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensor() as mode:
        linear_cross_entropy(
            hidden, weight, labels, bias, chunk_size=chunk, backend=backend
        ).backward()
    # Nothing bigger than a chunk of logits, the weight or the hidden states; the full logits
    # would be 8x larger than a chunk.
    assert mode.largest <= max(chunk * vocab, vocab * hidden_dim, n_tokens * hidden_dim)


def test_torch_compile_traces_triton_path():
    device = kernel_device()
    tensors, labels = _inputs(11, 16, 90, torch.float32, device, n_ignored=1)

    def loss_fn(hidden, weight, labels, bias):
        return linear_cross_entropy(
            hidden * 1.0,
            weight,
            labels,
            bias,
            label_smoothing=0.1,
            lse_square_scale=1e-3,
            chunk_size=4,
            backend="triton",
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(_run(compiled, tensors, labels), _run(loss_fn, tensors, labels)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs CUDA (the interpreter mishandles bf16)")
def test_bf16_cuda():
    tensors, labels = _inputs(300, 64, 32003, torch.bfloat16, "cuda", n_ignored=7)
    got = _run(linear_cross_entropy, tensors, labels, chunk_size=64, backend="triton")
    oracle = _run(linear_cross_entropy_ref, [t.double() for t in tensors], labels)
    plain = _run(linear_cross_entropy_ref, tensors, labels)
    for err, budget in zip(_errs(got, oracle), _errs(plain, oracle)):
        assert err <= 2 * budget + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    device = _device(backend)
    (hidden, weight, bias), labels = _inputs(4, 6, 10, torch.float32, device)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(
            hidden, weight, torch.tensor([0, 1, 10, 2], device=device), backend=backend
        )
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:3], backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden[:, :5], weight, labels, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, labels, bias[:9], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(hidden.double(), weight, labels, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_allocates_no_gradients(backend):
    device = _device(backend)
    (hidden, weight, _), labels = _inputs(32, 64, 300, torch.float32, device, bias=False)
    weight.requires_grad_()
    with torch.no_grad(), _LargestTensor() as mode:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8, backend=backend)
    # No weight-sized (300 x 64) gradient accumulator: nothing beyond a chunk of logits.
    assert mode.largest <= 8 * 300
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), labels))
