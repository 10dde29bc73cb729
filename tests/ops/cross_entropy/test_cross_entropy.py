"""Fused cross-entropy: Triton (interpreter on CPU) and torch backends against an fp64 oracle
and against F.cross_entropy with the same options."""

import pytest
import torch
import torch.nn.functional as F

from flash_attn.modules.losses import CrossEntropyLoss
from flash_attn.ops.cross_entropy import cross_entropy_loss
from flash_attn.ops.cross_entropy.reference import cross_entropy_ref
from tests.testing import HAS_CUDA, assert_compiles_for_gpu, kernel_device

BACKENDS = ["triton", "torch"]


def _device(backend):
    return kernel_device() if backend == "triton" else "cpu"


def _inputs(n_rows, vocab, dtype, device, n_ignored=0, ignore_index=-100):
    logits = (torch.randn(n_rows, vocab, dtype=torch.float32) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, (n_rows,))
    labels[:n_ignored] = ignore_index
    return logits.requires_grad_(), labels.to(device)


def _plain(logits, labels, eps, z, ignore_index, reduction):
    """Plain PyTorch at the logits' precision: the error budget of the tolerance criterion."""
    loss = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=eps, reduction="none"
    )
    if z:
        loss = loss + z * torch.logsumexp(logits, -1).square() * (labels != ignore_index)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum()


def _loss_and_grad(fn, logits, labels, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels, **kw)
    # A weighted sum, so reduction="none" also checks a per-row upstream gradient.
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach().double(), x.grad.double()


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_rows, vocab", [(7, 1), (7, 7), (13, 1000), (5, 4099), (3, 50257)])
@pytest.mark.parametrize("eps, z", [(0.0, 0.0), (0.1, 1e-3)])
def test_within_twice_plain_pytorch_error(backend, dtype, n_rows, vocab, eps, z):
    device = _device(backend)
    logits, labels = _inputs(n_rows, vocab, dtype, device, n_ignored=1)
    opts = dict(label_smoothing=eps, lse_square_scale=z, reduction="none")
    loss, grad = _loss_and_grad(cross_entropy_loss, logits, labels, backend=backend, **opts)
    ref_loss, ref_grad = _loss_and_grad(cross_entropy_ref, logits.double(), labels, **opts)
    pt_loss, pt_grad = _loss_and_grad(
        _plain, logits, labels, eps=eps, z=z, ignore_index=-100, reduction="none"
    )
    # The lse sums the vocab in fp32 in an order that differs between CPUs (vector widths): its
    # rounding error grows like sqrt(vocab) * eps(fp32), and so does the atol.
    atol = (1e-6 if dtype == torch.float32 else 1e-3) + torch.finfo(torch.float32).eps * vocab**0.5
    assert _err(loss, ref_loss) <= 2 * _err(pt_loss, ref_loss) + atol
    assert _err(grad, ref_grad) <= 2 * _err(pt_grad, ref_grad) + atol
    assert grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_matches_f_cross_entropy(backend, reduction, eps, ignore_index):
    device = _device(backend)
    logits, labels = _inputs(11, 257, torch.float32, device, n_ignored=3, ignore_index=ignore_index)
    kw = dict(label_smoothing=eps, ignore_index=ignore_index, reduction=reduction)
    loss, grad = _loss_and_grad(cross_entropy_loss, logits, labels, backend=backend, **kw)
    ref_loss, ref_grad = _loss_and_grad(F.cross_entropy, logits, labels, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_adds_lse_squared(backend):
    device = _device(backend)
    logits, labels = _inputs(9, 130, torch.float32, device, n_ignored=2)
    base = cross_entropy_loss(logits, labels, reduction="none", backend=backend)
    with_z = cross_entropy_loss(
        logits, labels, lse_square_scale=0.3, reduction="none", backend=backend
    )
    z = 0.3 * torch.logsumexp(logits.detach(), -1).square() * (labels != -100)
    torch.testing.assert_close(with_z - base, z, rtol=1e-5, atol=1e-5)


def test_inplace_backward_writes_gradient_into_logits():
    device = kernel_device()
    weight = torch.randn(33, 301, device=device, requires_grad=True)
    hidden = torch.randn(6, 33, device=device)
    labels = torch.randint(0, 301, (6,), device=device)
    grads = []
    for inplace in (False, True):
        weight.grad = None
        logits = hidden @ weight  # (6, 301), not a leaf: its storage may receive the gradient
        logits.retain_grad()
        loss = cross_entropy_loss(
            logits, labels, 0.1, 1e-2, inplace_backward=inplace, backend="triton"
        )
        loss.backward()
        grads.append(weight.grad.clone())
        if inplace:
            # After the backward, the logits' storage holds dlogits.
            torch.testing.assert_close(logits.detach(), logits.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_matches_f_cross_entropy(backend):
    device = _device(backend)
    logits, labels = _inputs(4, 10, torch.float32, device, n_ignored=4)
    assert torch.isnan(cross_entropy_loss(logits, labels, backend=backend))
    assert cross_entropy_loss(logits, labels, reduction="sum", backend=backend).item() == 0.0
    assert torch.isnan(F.cross_entropy(logits, labels))


@pytest.mark.parametrize("vocab", [65536, 262144])
def test_large_vocab_is_split_into_column_blocks(vocab):
    # 16384-column blocks under the interpreter (8192 on a GPU): 4 or 16 partial lse per row
    # must combine exactly, and the label may fall in any block, at either edge.
    device = kernel_device()
    logits, _ = _inputs(4, vocab, torch.float32, device)
    labels = torch.tensor([0, 16383, 16384, vocab - 1], device=device)
    kw = dict(label_smoothing=0.1, reduction="none")
    loss, grad = _loss_and_grad(cross_entropy_loss, logits, labels, backend="triton", **kw)
    # fp64 oracle: in fp32, F.cross_entropy's smoothing gradient sums vocab terms of eps / V
    # and drifts by ~1e-5 at this width, far more than the kernel does.
    ref_loss, ref_grad = _loss_and_grad(F.cross_entropy, logits.double(), labels, **kw)
    # The lse sums vocab exponentials in fp32: a relative error that grows like sqrt(vocab) * eps
    # becomes the loss's absolute error.
    atol = torch.finfo(torch.float32).eps * vocab**0.5
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-7)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs CUDA (the interpreter mishandles bf16)")
def test_bf16_cuda():
    logits, labels = _inputs(64, 32003, torch.bfloat16, "cuda", n_ignored=5)
    loss, grad = _loss_and_grad(cross_entropy_loss, logits, labels, backend="triton")
    ref_loss, ref_grad = _loss_and_grad(cross_entropy_ref, logits.double(), labels)
    pt_loss, pt_grad = _loss_and_grad(_plain, logits, labels, 0.0, 0.0, -100, "mean")
    assert _err(loss, ref_loss) <= 2 * _err(pt_loss, ref_loss) + 1e-3
    assert _err(grad, ref_grad) <= 2 * _err(pt_grad, ref_grad) + 1e-3


def test_module_matches_nn_cross_entropy():
    device = kernel_device()
    logits, labels = _inputs(8, 50, torch.float32, device, n_ignored=2)
    ours = CrossEntropyLoss(label_smoothing=0.1, reduction="sum", backend="triton")
    theirs = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(ours(logits, labels), theirs(logits, labels))
    assert "label_smoothing=0.1" in repr(ours)


def _misaligned(t):
    """A copy of t one element into a fresh buffer: contiguous, not 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    assert view.data_ptr() % 16 != 0
    return view.copy_(t)


@pytest.mark.parametrize("layout", ["row_strided", "column_strided"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_strided_logits_and_gradient_views_in_repeated_calls(layout, reduction, inplace):
    """Logits read in place through their row stride (a slice of wider rows) or copied (a
    non-unit column stride), int32 labels, and for reduction="none" an upstream gradient that
    is a non-contiguous then a misaligned view: every call of the signature, the first (which
    builds the launches) and later ones, matches F.cross_entropy."""
    device = kernel_device()
    labels = torch.randint(0, 37, (9,), dtype=torch.int32, device=device)
    labels[2] = -100
    for _ in range(3):
        wide = torch.randn(9, 50, device=device, requires_grad=True)
        column_major = wide.t().contiguous().t()
        logits = wide[:, 3:40] if layout == "row_strided" else column_major[:, :37]
        loss = cross_entropy_loss(
            logits, labels, 0.1, reduction=reduction, inplace_backward=inplace, backend="triton"
        )
        ref_loss = F.cross_entropy(
            logits.detach(), labels.long(), label_smoothing=0.1, reduction=reduction
        )
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        weights = torch.linspace(0.5, 1.5, 18, device=device)
        grads = [torch.tensor(0.7, device=device)]
        if reduction == "none":
            grads = [weights[::2], _misaligned(weights[:9])]
        for dloss in grads:
            x = logits.detach().clone().requires_grad_()
            ref = F.cross_entropy(x, labels.long(), label_smoothing=0.1, reduction=reduction)
            (ref_grad,) = torch.autograd.grad(ref, x, dloss)
            (grad,) = torch.autograd.grad(loss, wide, dloss, retain_graph=not inplace)
            cols = slice(3, 40) if layout == "row_strided" else slice(0, 37)
            torch.testing.assert_close(grad[:, cols], ref_grad, rtol=1e-5, atol=1e-7)
            if inplace:
                break  # the logits' storage now holds the gradient


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_without_grad_matches_with_grad(reduction):
    device = kernel_device()
    logits, labels = _inputs(6, 40, torch.float16, device, n_ignored=2)
    opts = dict(lse_square_scale=1e-2, reduction=reduction, return_z_loss=True, backend="triton")
    with torch.no_grad():
        loss, z_loss = cross_entropy_loss(logits, labels, **opts)
    assert not loss.requires_grad
    expected = cross_entropy_loss(logits, labels, **opts)
    torch.testing.assert_close(loss, expected[0].detach())
    torch.testing.assert_close(z_loss, expected[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_traces_triton_path(inplace):
    device = kernel_device()

    def loss_fn(x, labels):
        return cross_entropy_loss(
            x * 2.0, labels, 0.1, 1e-3, inplace_backward=inplace, backend="triton"
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits, labels = _inputs(5, 77, torch.float32, device, n_ignored=1)
    loss, grad = _loss_and_grad(compiled, logits, labels)
    ref_loss, ref_grad = _loss_and_grad(loss_fn, logits, labels)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eps, z", [(0.0, 0.0), (0.1, 1e-3)])
def test_logit_scale_within_twice_plain_pytorch_error(backend, dtype, eps, z):
    device = _device(backend)
    vocab, scale = 1000, 0.7
    logits, labels = _inputs(13, vocab, dtype, device, n_ignored=2)
    opts = dict(label_smoothing=eps, lse_square_scale=z, reduction="none")
    loss, grad = _loss_and_grad(
        cross_entropy_loss, logits, labels, logit_scale=scale, backend=backend, **opts
    )
    ref_loss, ref_grad = _loss_and_grad(
        cross_entropy_ref, logits.double(), labels, logit_scale=scale, **opts
    )
    pt_loss, pt_grad = _loss_and_grad(
        lambda x, y, **kw: _plain(x * scale, y, **kw),
        logits,
        labels,
        eps=eps,
        z=z,
        ignore_index=-100,
        reduction="none",
    )
    atol = (1e-6 if dtype == torch.float32 else 1e-3) + torch.finfo(torch.float32).eps * vocab**0.5
    assert _err(loss, ref_loss) <= 2 * _err(pt_loss, ref_loss) + atol
    assert _err(grad, ref_grad) <= 2 * _err(pt_grad, ref_grad) + atol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_z_loss(backend, reduction):
    device = _device(backend)
    logits, labels = _inputs(9, 130, torch.float32, device, n_ignored=2)
    loss, z_loss = cross_entropy_loss(
        logits,
        labels,
        lse_square_scale=0.3,
        reduction=reduction,
        return_z_loss=True,
        backend=backend,
    )
    per_row_z = 0.3 * torch.logsumexp(logits.detach(), -1).square() * (labels != -100)
    expected = per_row_z if reduction == "none" else per_row_z.sum() / 7
    torch.testing.assert_close(z_loss, expected, rtol=1e-5, atol=1e-5)
    assert not z_loss.requires_grad and loss.requires_grad
    torch.testing.assert_close(
        loss, cross_entropy_loss(logits, labels, lse_square_scale=0.3, reduction=reduction)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_lse(backend):
    """Used (value and softmax gradient) without logit scale and smoothing, else ignored."""
    device = _device(backend)
    logits, labels = _inputs(6, 50, torch.float32, device, n_ignored=1)
    lse = torch.logsumexp(logits.detach(), -1)
    plain = _loss_and_grad(cross_entropy_loss, logits, labels, reduction="none", backend=backend)
    given = _loss_and_grad(
        cross_entropy_loss, logits, labels, reduction="none", backend=backend, precomputed_lse=lse
    )
    for a, b in zip(given, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    shifted = cross_entropy_loss(
        logits, labels, reduction="none", precomputed_lse=lse + 1.0, backend=backend
    )
    torch.testing.assert_close(shifted - plain[0].float(), (labels != -100).float())
    smoothed = dict(label_smoothing=0.1, reduction="none", backend=backend)
    torch.testing.assert_close(
        cross_entropy_loss(logits, labels, precomputed_lse=lse + 1.0, **smoothed),
        cross_entropy_loss(logits, labels, **smoothed),
    )


def _vocab_parallel_worker(rank, world_size, port, out_dir):
    """One rank: its half of the vocabulary, both backends; saves loss and gradient shards."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        logits, labels = _inputs(7, 2 * 37, torch.float32, "cpu", n_ignored=1)
        shard = logits.detach().chunk(world_size, dim=1)[rank]
        results = {}
        for backend in BACKENDS:
            x = shard.clone().to(_device(backend)).requires_grad_()
            loss, z_loss = cross_entropy_loss(
                x,
                labels.to(x.device),
                label_smoothing=0.1,
                lse_square_scale=1e-3,
                reduction="none",
                logit_scale=0.8,
                return_z_loss=True,
                process_group=dist.group.WORLD,
                backend=backend,
            )
            (loss * torch.linspace(0.5, 1.5, 7, device=x.device)).sum().backward()
            results[backend] = (loss.detach().cpu(), z_loss.cpu(), x.grad.cpu())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_process_group_vocab_parallel_matches_unsharded(tmp_path):
    """Two gloo ranks holding half the vocabulary each: the loss every rank gets and the
    gradient of each shard equal the unsharded computation's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_vocab_parallel_worker, args=(2, port, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    logits, labels = _inputs(7, 2 * 37, torch.float32, "cpu", n_ignored=1)
    opts = dict(label_smoothing=0.1, lse_square_scale=1e-3, reduction="none", logit_scale=0.8)
    ref_loss, ref_grad = _loss_and_grad(cross_entropy_ref, logits.double(), labels, **opts)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref_z = 1e-3 * torch.logsumexp(0.8 * logits.detach().double(), -1).square() * (labels != -100)
    for backend in BACKENDS:
        for rank, results in enumerate(ranks):
            loss, z_loss, grad = results[backend]
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(z_loss.double(), ref_z, rtol=1e-5, atol=1e-6)
            expected_grad = ref_grad.chunk(2, dim=1)[rank]
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_custom_op_registration_is_consistent():
    device = kernel_device()
    logits, labels = _inputs(3, 20, torch.float32, device, n_ignored=1)
    torch.library.opcheck(
        torch.ops.flash_attn.cross_entropy_fwd.default,
        (logits, labels, None, 0.1, 0.5, 1e-3, -100, False),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    device = _device(backend)
    logits, labels = _inputs(4, 10, torch.float32, device)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_loss(logits, torch.tensor([0, 1, 10, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_loss(logits, torch.tensor([0, -1, 3, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_loss(logits, labels[:3], backend=backend)
    with pytest.raises(TypeError, match="labels"):
        cross_entropy_loss(logits, labels.float(), backend=backend)
    with pytest.raises(ValueError, match="logits"):
        cross_entropy_loss(logits[None], labels, backend=backend)
    with pytest.raises(TypeError, match="logits"):
        cross_entropy_loss(logits.long(), labels, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_loss(logits, labels, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_loss(logits, labels, label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")


def test_triton_rejects_fp64():
    logits, labels = _inputs(4, 10, torch.float64, kernel_device())
    with pytest.raises(TypeError, match="logits"):
        cross_entropy_loss(logits, labels, backend="triton")


_COMPILE_FOR_SM90 = """
from flash_attn.ops.cross_entropy.triton.kernels import (
    _cross_entropy_bwd_kernel, _cross_entropy_fwd_kernel)
from benchmarks.triton_compile import compile_for_gpu

for dt in ("bf16", "fp32"):
    compile_for_gpu(_cross_entropy_fwd_kernel,
        dict(Logits=f"*{dt}", Labels="*i64", LsePartial="*fp32", LossPartial="*fp32",
             stride_row="i64", n_cols="i32", n_blocks="i32", label_smoothing="fp32",
             logit_scale="fp32", ignore_index="i64", class_start="i64", total_classes="i64"),
        dict(BLOCK_N=8192))
    compile_for_gpu(_cross_entropy_bwd_kernel,
        dict(DLogits=f"*{dt}", Logits=f"*{dt}", Labels="*i64", Lse="*fp32", DLoss="*fp32",
             stride_dlogits_row="i64", stride_logits_row="i64", stride_dloss="i64",
             n_cols="i32", label_smoothing="fp32", logit_scale="fp32", lse_square_scale="fp32",
             ignore_index="i64", class_start="i64", total_classes="i64"),
        dict(BLOCK_N=8192))
print("compiled")
"""


def test_kernels_compile_for_gpu():
    """The interpreter accepts code the compiler rejects: compile to sm_90 (no GPU needed)."""
    assert_compiles_for_gpu(_COMPILE_FOR_SM90, timeout=300)
