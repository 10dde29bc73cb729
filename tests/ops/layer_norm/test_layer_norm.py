"""Fused dropout + residual + LayerNorm/RMSNorm: kernels, torch path, modules, errors.

Criterion (DESIGN.md): error against an fp64 reference at most twice the error of plain
PyTorch (F.layer_norm / F.rms_norm on the same low-precision inputs), plus a tiny atol.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flash_attn.modules.norm import LayerNorm, RMSNorm
from flash_attn.ops.layer_norm import layer_norm_fn, layer_norm_linear_fn, rms_norm_fn
from flash_attn.ops.layer_norm.reference import layer_norm_ref, rms_norm_ref
from flash_attn.ops.layer_norm.triton.kernels import layer_norm_bwd, layer_norm_fwd
from tests.testing import DTYPES, assert_compiles_for_gpu, kernel_device

DEVICE = kernel_device()
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BACKENDS = ["triton", "torch"]


def _plain(x, weight, bias, residual, eps, is_rms_norm):
    """Plain PyTorch at the inputs' precision: the error baseline of the criterion."""
    h = x if residual is None else x + residual
    if is_rms_norm:
        y = F.rms_norm(h, (x.shape[-1],), weight, eps)
        return y + bias if bias is not None else y
    return F.layer_norm(h, (x.shape[-1],), weight, bias, eps)


def _check(name, got, plain, oracle, dtype, n=1):
    """got within twice plain's error of the oracle, plus an atol. n is the length of the sum
    behind the output (hidden for the statistics, rows for the weight gradients): fp32 sums
    round in an order that differs between CPUs, with an error growing like sqrt(n) * eps."""
    oracle = oracle.double()
    err = (got.double() - oracle).abs().max().item()
    base = (plain.double() - oracle).abs().max().item()
    scale = max(1.0, oracle.abs().max().item())
    atol = (ATOL[dtype] + torch.finfo(torch.float32).eps * n**0.5) * scale
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 * plain {base:.3g} + {atol:.3g}"


def _inputs(rows, hidden, dtype, with_bias=True, with_residual=True, residual_dtype=None):
    x = torch.randn(rows, hidden, dtype=dtype, device=DEVICE)
    weight = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(dtype)
    bias = torch.randn(hidden, dtype=dtype, device=DEVICE) if with_bias else None
    residual = None
    if with_residual:
        residual = torch.randn(rows, hidden, dtype=residual_dtype or dtype, device=DEVICE)
    return x, weight, bias, residual


def _leaves(*tensors, dtype=None):
    return [
        None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors
    ]


def _run_and_grads(fn, tensors, dy, dres):
    out = fn(*tensors)
    y, residual_out = out if isinstance(out, tuple) else (out, None)
    loss = (y.double() * dy).sum()
    if residual_out is not None:
        loss = loss + (residual_out.double() * dres).sum()
    loss.backward()
    return y, residual_out, [t.grad if t is not None else None for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize(
    "rows, hidden, with_bias, with_residual, prenorm",
    [
        (1, 1, True, False, False),
        (3, 7, True, True, True),
        (113, 1000, True, True, False),
        (5, 4099, False, True, True),
        (2, 250, False, False, True),
    ],
)
def test_matches_reference(
    backend, dtype, is_rms_norm, rows, hidden, with_bias, with_residual, prenorm
):
    eps = 1e-5
    x, weight, bias, residual = _inputs(rows, hidden, dtype, with_bias, with_residual)
    dy = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)
    dres = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)

    def fused(x, w, b, r):
        return layer_norm_fn(
            x, w, b, r, eps=eps, prenorm=prenorm, is_rms_norm=is_rms_norm, backend=backend
        )

    def oracle(x, w, b, r):
        return layer_norm_ref(x, w, b, r, eps=eps, prenorm=prenorm, is_rms_norm=is_rms_norm)

    def plain(x, w, b, r):
        y = _plain(x, w, b, r, eps, is_rms_norm)
        return (y, x if r is None else x + r) if prenorm else y

    y, res_out, grads = _run_and_grads(fused, _leaves(x, weight, bias, residual), dy, dres)
    y_ref, res_ref, grads_ref = _run_and_grads(
        oracle, _leaves(x, weight, bias, residual, dtype=torch.float64), dy, dres
    )
    y_pl, res_pl, grads_pl = _run_and_grads(plain, _leaves(x, weight, bias, residual), dy, dres)

    assert y.dtype == dtype and y.shape == x.shape
    _check("out", y, y_pl, y_ref, dtype, hidden)
    if prenorm:
        assert res_out.dtype == dtype
        _check("residual_out", res_out, res_pl, res_ref, dtype)
    lengths = dict(dx=hidden, dweight=rows, dbias=rows, dresidual=hidden)
    for name, g, g_pl, g_ref in zip(lengths, grads, grads_pl, grads_ref):
        if g_ref is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        _check(name, g, g_pl, g_ref, dtype, lengths[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("residual_dtype", [torch.float16, torch.float32, None])
def test_residual_dtypes(backend, residual_in_fp32, residual_dtype):
    """fp16 x with an fp16/fp32/no residual: residual_out's dtype and every gradient."""
    dtype = torch.float16
    x, weight, bias, residual = _inputs(
        17, 96, dtype, with_residual=residual_dtype is not None, residual_dtype=residual_dtype
    )
    dy = torch.randn(17, 96, dtype=torch.float64, device=DEVICE)
    dres = torch.randn(17, 96, dtype=torch.float64, device=DEVICE)

    def fused(x, w, b, r):
        return layer_norm_fn(
            x, w, b, r, prenorm=True, residual_in_fp32=residual_in_fp32, backend=backend
        )

    y, res_out, grads = _run_and_grads(fused, _leaves(x, weight, bias, residual), dy, dres)
    # flash-attn 2.x: residual_in_fp32 only decides when there is no residual.
    expected = residual_dtype or (torch.float32 if residual_in_fp32 else dtype)
    assert res_out.dtype == expected
    leaves64 = _leaves(x, weight, bias, residual, dtype=torch.float64)
    y_ref, res_ref, grads_ref = _run_and_grads(
        lambda *t: layer_norm_ref(*t, prenorm=True), leaves64, dy, dres
    )
    torch.testing.assert_close(y.double(), y_ref, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(res_out.double(), res_ref, atol=5e-3, rtol=5e-3)
    for g, g_ref, t in zip(grads, grads_ref, (x, weight, bias, residual)):
        if t is None:
            continue
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.double(), g_ref, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("hidden", [1000, 4099])
def test_chunked_rows_launcher(is_rms_norm, hidden):
    """Rows longer than the block limit are walked in chunks: lower the limit to reach it."""
    rows = 6
    x, weight, bias, residual = _inputs(rows, hidden, torch.float32)
    bias = None if is_rms_norm else bias
    dy = torch.randn(rows, hidden, device=DEVICE)
    dres = torch.randn(rows, hidden, device=DEVICE)
    outs = {}
    for max_block in (8192, 256):
        y, _, res_out, mean, rstd, _, _ = layer_norm_fwd(
            x,
            weight,
            bias,
            1e-5,
            residual,
            is_rms_norm=is_rms_norm,
            store_residual_out=True,
            max_block=max_block,
        )
        grads = layer_norm_bwd(
            dy,
            res_out,
            weight,
            mean,
            rstd,
            dres,
            is_rms_norm=is_rms_norm,
            residual_dtype=torch.float32,
            max_block=max_block,
        )[:4]
        outs[max_block] = (y, res_out, *grads)
    leaves = _leaves(x, weight, bias, residual, dtype=torch.float64)
    y_ref, res_ref, grads_ref = _run_and_grads(
        lambda *t: layer_norm_ref(*t, prenorm=True, is_rms_norm=is_rms_norm),
        leaves,
        dy.double(),
        dres.double(),
    )
    dx_ref, dw_ref, db_ref, dr_ref = grads_ref
    if db_ref is None:
        db_ref = dy.double().sum(0)
    for got in outs.values():
        for g, ref in zip(got, (y_ref, res_ref, dx_ref, dw_ref, db_ref, dr_ref)):
            torch.testing.assert_close(g.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("hidden", [8192, 8193, 65536])
def test_long_rows(is_rms_norm, hidden):
    """Both sides of the default block limit (8192): one block per row, then chunks."""
    x, weight, bias, residual = _inputs(2, hidden, torch.float32)
    leaves = _leaves(x, weight, bias, residual)
    dy = torch.randn(2, hidden, dtype=torch.float64, device=DEVICE)
    y, _, grads = _run_and_grads(
        lambda *t: layer_norm_fn(*t, is_rms_norm=is_rms_norm, backend="triton"), leaves, dy, None
    )
    y_ref, _, grads_ref = _run_and_grads(
        lambda *t: layer_norm_ref(*t, is_rms_norm=is_rms_norm),
        _leaves(x, weight, bias, residual, dtype=torch.float64),
        dy,
        None,
    )
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-4)


def _keep_mask(residual_out, residual):
    """The dropout mask, recovered from residual_out = dropout(x) + residual (x != 0)."""
    return residual_out != residual


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_and_seed(backend):
    p, rows, hidden = 0.3, 64, 257
    x = torch.randn(rows, hidden, device=DEVICE)
    weight, bias = torch.ones(hidden, device=DEVICE), torch.zeros(hidden, device=DEVICE)
    residual = torch.zeros(rows, hidden, device=DEVICE)

    def run(seed):
        torch.manual_seed(seed)
        return layer_norm_fn(x, weight, bias, residual, dropout_p=p, prenorm=True, backend=backend)

    y, res_out = run(1)
    keep = _keep_mask(res_out, residual)
    n = keep.numel()
    # Within 5 standard deviations of a Bernoulli(1 - p) count.
    assert abs(keep.sum().item() - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5
    torch.testing.assert_close(res_out[keep], x[keep] / (1 - p))
    y2, res_out2 = run(1)
    assert torch.equal(y, y2) and torch.equal(res_out, res_out2)
    _, res_out3 = run(2)
    assert not torch.equal(keep, _keep_mask(res_out3, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
def test_dropout_backward_uses_the_forward_mask(dtype, is_rms_norm, prenorm):
    """The kernel's output and gradients equal the reference run with the kernel's own mask."""
    p, rows, hidden = 0.2, 33, 300
    x, weight, bias, residual = _inputs(rows, hidden, dtype)
    dy = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)
    dres = torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE)
    # A run with a zero residual and the same seed reveals the mask (x is nonzero).
    torch.manual_seed(7)
    _, probe = layer_norm_fn(
        x,
        weight,
        bias,
        torch.zeros_like(residual),
        dropout_p=p,
        prenorm=True,
        is_rms_norm=is_rms_norm,
        backend="triton",
    )
    keep = probe != 0
    torch.manual_seed(7)
    y, res_out, grads = _run_and_grads(
        lambda *t: layer_norm_fn(
            *t, dropout_p=p, prenorm=prenorm, is_rms_norm=is_rms_norm, backend="triton"
        ),
        _leaves(x, weight, bias, residual),
        dy,
        dres,
    )
    y_ref, res_ref, grads_ref = _run_and_grads(
        lambda *t: layer_norm_ref(
            *t, dropout_p=p, prenorm=prenorm, is_rms_norm=is_rms_norm, dropout_mask=keep
        ),
        _leaves(x, weight, bias, residual, dtype=torch.float64),
        dy,
        dres,
    )
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    if prenorm:
        torch.testing.assert_close(res_out.double(), res_ref, **tol)
    dx = grads[0]
    assert torch.all(dx[~keep] == 0), "dx must vanish where x was dropped"
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **tol)


# -- the flash-attn 2.x features: x1 / weight1 / bias1, rowscale, zero-centred weights, masks --

FEATURE_CASES = {
    # name: (x1, weight1 and bias1, rowscale, zero_centered_weight, dropout_p, prenorm)
    "parallel_outputs": (True, True, False, False, 0.0, True),
    "second_input": (True, False, False, True, 0.0, False),
    "rowscale_zero_centered": (False, False, True, True, 0.0, True),
    "second_output": (False, True, True, False, 0.0, False),
    "dropout_both_inputs": (True, True, False, True, 0.2, True),
}


def _feature_inputs(rows, hidden, dtype, case):
    with_x1, with_w1, with_rowscale = FEATURE_CASES[case][:3]
    x, weight, bias, residual = _inputs(rows, hidden, dtype)
    x1 = torch.randn(rows, hidden, dtype=dtype, device=DEVICE) if with_x1 else None
    weight1 = bias1 = None
    if with_w1:
        weight1, bias1, _ = _inputs(rows, hidden, dtype, with_residual=False)[1:]
    rowscale = torch.rand(rows, device=DEVICE).to(dtype) + 0.5 if with_rowscale else None
    return [x, weight, bias, residual, x1, weight1, bias1], rowscale


def _plain_features(x, w, b, r, x1, w1, b1, rowscale, keep, keep1, p, zero_centered, eps, rms):
    """Plain PyTorch at the inputs' precision: every add and the norms in x's dtype."""
    h = x if rowscale is None else x * rowscale.unsqueeze(-1)
    if keep is not None:
        h = h * keep / (1 - p)
    if x1 is not None:
        h = h + (x1 * keep1 / (1 - p) if keep1 is not None else x1)
    h = h + r
    outs = [_plain(h, w + 1 if zero_centered else w, b, None, eps, rms)]
    if w1 is not None:
        outs.append(_plain(h, w1 + 1 if zero_centered else w1, b1, None, eps, rms))
    return outs, h


def _feature_loss(outs, residual_out, grads_out):
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads_out))
    return loss + ((residual_out.double() * grads_out[-1]).sum() if residual_out is not None else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_rms_norm", [False, True])
@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_features_match_reference(backend, dtype, is_rms_norm, case):
    """Forward and backward of every 2.x feature within twice plain PyTorch's error."""
    with_x1, with_w1, _, zero_centered, p, prenorm = FEATURE_CASES[case]
    rows, hidden, eps = 9, 130, 1e-5
    tensors, rowscale = _feature_inputs(rows, hidden, dtype, case)
    grads_out = [torch.randn(rows, hidden, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    options = dict(
        eps=eps,
        dropout_p=p,
        rowscale=rowscale,
        prenorm=prenorm,
        zero_centered_weight=zero_centered,
        is_rms_norm=is_rms_norm,
    )

    leaves = _leaves(*tensors)
    result = layer_norm_fn(*leaves, **options, return_dropout_mask=True, backend=backend)
    n_out = 2 if with_w1 else 1
    outs, rest = list(result[:n_out]), list(result[n_out:])
    residual_out = rest.pop(0) if prenorm else None
    keep, keep1 = rest
    assert (keep is None) == (p == 0.0) and (keep1 is None) == (p == 0.0 or not with_x1)
    _feature_loss(outs, residual_out, grads_out).backward()

    oracle_leaves = _leaves(*tensors, dtype=torch.float64)
    oracle = layer_norm_ref(*oracle_leaves, **options, dropout_mask=keep, dropout_mask1=keep1)
    oracle = oracle if isinstance(oracle, tuple) else (oracle,)
    _feature_loss(oracle[:n_out], oracle[n_out] if prenorm else None, grads_out).backward()

    plain_leaves = _leaves(*tensors)
    plain, h = _plain_features(
        *plain_leaves, rowscale, keep, keep1, p, zero_centered, eps, is_rms_norm
    )
    _feature_loss(plain, h if prenorm else None, grads_out).backward()

    for i, (got, pl, ref) in enumerate(zip(outs, plain, oracle)):
        assert got.dtype == dtype
        _check(f"out{i}", got, pl, ref, dtype, hidden)
    if prenorm:
        _check("residual_out", residual_out, h, oracle[n_out], dtype)
    names = ("dx", "dweight", "dbias", "dresidual", "dx1", "dweight1", "dbias1")
    lengths = (hidden, rows, rows, hidden, hidden, rows, rows)
    for name, n, t, t_pl, t_ref in zip(names, lengths, leaves, plain_leaves, oracle_leaves):
        if t is None:
            continue
        assert t.grad.dtype == t.dtype, name
        _check(name, t.grad, t_pl.grad, t_ref.grad, dtype, n)


@pytest.mark.parametrize("is_rms_norm", [False, True])
def test_features_in_chunked_rows(is_rms_norm):
    """Rows walked in chunks give what one block per row gives, with every feature on."""
    rows, hidden, p = 5, 700, 0.25
    (x, w, b, r, x1, w1, b1), _ = _feature_inputs(rows, hidden, torch.float32, "parallel_outputs")
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    dys = [torch.randn(rows, hidden, device=DEVICE) for _ in range(3)]
    results = []
    for max_block in (8192, 128):
        common = dict(
            dropout_p=p,
            seed=seed,
            zero_centered_weight=True,
            is_rms_norm=is_rms_norm,
            max_block=max_block,
        )
        y, y1, h, mean, rstd, keep, keep1 = layer_norm_fwd(
            x,
            w,
            b,
            1e-5,
            r,
            x1,
            w1,
            b1,
            residual_dtype=torch.float32,
            store_residual_out=True,
            store_dropout_mask=True,
            **common,
        )
        grads = layer_norm_bwd(
            dys[0],
            h,
            w,
            mean,
            rstd,
            dys[2],
            dys[1],
            w1,
            x_dtype=torch.float32,
            x1_dtype=torch.float32,
            residual_dtype=torch.float32,
            **common,
        )
        results.append((y, y1, h, mean, rstd, keep, keep1, *grads))
    for single, chunked in zip(*results):
        torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)


def test_rowscale_scales_rows_and_their_gradient():
    x, weight, bias, residual = _inputs(4, 16, torch.float32)
    rowscale = torch.tensor([0.0, 1.0, 2.0, 0.5], device=DEVICE)
    x = x.requires_grad_()
    _, h = layer_norm_fn(x, weight, bias, residual, rowscale=rowscale, prenorm=True)
    torch.testing.assert_close(h, x.detach() * rowscale[:, None] + residual)
    h.sum().backward()
    torch.testing.assert_close(x.grad, rowscale[:, None].expand(4, 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["out", "residual_out", "out1"])
def test_gradient_through_one_output(backend, used):
    """The backward runs when only some outputs are differentiated (the others' gradients are
    undefined, not zeros): each input's gradient is that of the outputs used."""
    x, weight, bias, residual = _inputs(4, 16, torch.float32)
    x, weight, residual = _leaves(x, weight, residual)
    weight1 = weight.detach().flip(0).requires_grad_()
    out, out1, residual_out = layer_norm_fn(
        x, weight, bias, residual, weight1=weight1, prenorm=True, backend=backend
    )
    {"out": out, "residual_out": residual_out, "out1": out1}[used].sum().backward()
    if used == "residual_out":  # h = x + residual: the norm's weights get nothing
        torch.testing.assert_close(x.grad, torch.ones_like(x))
        assert weight.grad is None or not weight.grad.any()
        assert weight1.grad is None or not weight1.grad.any()
        return
    h = (x + residual).detach()
    xhat = F.layer_norm(h, (16,), eps=1e-6)
    used_weight, other = (weight, weight1) if used == "out" else (weight1, weight)
    torch.testing.assert_close(used_weight.grad, xhat.sum(0), atol=1e-5, rtol=1e-5)
    assert other.grad is None or not other.grad.any()
    # d/dh of sum(xhat * w) for LayerNorm: rstd * (w - mean(w) - xhat * mean(w * xhat)).
    w = used_weight.detach()
    rstd = (h.var(-1, unbiased=False, keepdim=True) + 1e-6).rsqrt()
    wx = (w * xhat).mean(-1, keepdim=True)
    expected = rstd * (w - w.mean() - xhat * wx)
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(residual.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_strided_inputs(layout):
    """(batch, seqlen, hidden) inputs whose rows are strided: a slice of wider rows is read in
    place through its row stride, a transposed tensor (its rows do not collapse into one
    strided dimension) is copied; both give the torch backend's outputs and gradients."""
    hidden = 24
    if layout == "sliced":
        x0 = torch.randn(2, 5, 40, device=DEVICE)[..., 8 : 8 + hidden]  # row stride 40
    else:
        x0 = torch.randn(2, hidden, 5, device=DEVICE).transpose(1, 2)  # (2, 5, 24)
    residual0 = torch.randn(2, 5, hidden, device=DEVICE)
    weight0 = 1 + 0.5 * torch.randn(hidden, device=DEVICE)
    dy = torch.randn(2, 5, hidden, device=DEVICE)
    results = {}
    for backend in BACKENDS:
        x, residual, weight = (t.detach().requires_grad_() for t in (x0, residual0, weight0))
        out, res = layer_norm_fn(x, weight, None, residual, prenorm=True, backend=backend)
        torch.autograd.backward([out, res], [dy, dy])
        results[backend] = (out, res, x.grad, residual.grad, weight.grad)
    for got, expected in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_residual_gradient_is_x_gradient_written_once(dropout_p):
    """Without dropout or rowscale, h = x + residual gives x and residual the same gradient:
    the backward writes it once and hands both the same tensor (each leaf still gets a .grad
    of its own). With dropout they differ and both are written."""
    x0, weight, bias, residual0 = _inputs(6, 32, torch.float32)
    grads = {}
    results = {}
    for backend in BACKENDS:
        x, residual = (t.detach().requires_grad_() for t in (x0, residual0))
        seen_x, seen_r = x * 1.0, residual * 1.0  # non-leaves: their hooks see what arrives
        seen_x.register_hook(lambda g: grads.__setitem__("x", g))
        seen_r.register_hook(lambda g: grads.__setitem__("residual", g))
        torch.manual_seed(0)
        out, res = layer_norm_fn(
            seen_x, weight, bias, seen_r, dropout_p=dropout_p, prenorm=True, backend=backend
        )
        (out.square().sum() + res.sum()).backward()
        if backend == "triton":
            assert (grads["x"] is grads["residual"]) == (dropout_p == 0.0)
        assert x.grad.data_ptr() != residual.grad.data_ptr()
        results[backend] = (x.grad, residual.grad)
    if dropout_p == 0.0:  # the backends draw different masks
        for got, expected in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_and_preallocated_outputs(backend):
    x, weight, bias, residual = _inputs(3, 24, torch.float32)
    out = torch.empty(3, 24, dtype=torch.float16, device=DEVICE)
    residual_out = torch.empty(3, 24, device=DEVICE)
    y, res = layer_norm_fn(
        x,
        weight,
        bias,
        residual,
        prenorm=True,
        out_dtype=torch.float16,
        out=out,
        residual_out=residual_out,
        backend=backend,
    )
    assert y is out and res is residual_out and y.dtype == torch.float16
    expected = layer_norm_ref(x, weight, bias, residual, prenorm=True)
    torch.testing.assert_close(y, expected[0].half())
    torch.testing.assert_close(res, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_dropout_mask_shapes(backend):
    x, weight, bias, _ = _inputs(6, 40, torch.float32)
    y, keep, keep1 = layer_norm_fn(x, weight, bias, return_dropout_mask=True, backend=backend)
    assert keep is None and keep1 is None
    y, keep, keep1 = layer_norm_fn(
        x, weight, bias, x1=x, dropout_p=0.5, return_dropout_mask=True, backend=backend
    )
    assert keep.dtype == torch.bool and keep.shape == x.shape and keep1.shape == x.shape
    assert not torch.equal(keep, keep1), "x and x1 draw independent masks"
    expected = layer_norm_ref(
        x, weight, bias, x1=x, dropout_p=0.5, dropout_mask=keep, dropout_mask1=keep1
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_linear_fn(backend, prenorm):
    x, weight, bias, residual = _inputs(5, 32, torch.float32)
    linear_weight = torch.randn(12, 32, device=DEVICE) / 32**0.5
    linear_bias = torch.randn(12, device=DEVICE)
    leaves = _leaves(x, weight, bias, linear_weight, linear_bias, residual)
    result = layer_norm_linear_fn(*leaves, 1e-5, prenorm, False, True, backend=backend)
    ref_leaves = _leaves(x, weight, bias, linear_weight, linear_bias, residual, dtype=torch.float64)
    normed = rms_norm_ref(ref_leaves[0], *ref_leaves[1:3], ref_leaves[5], eps=1e-5, prenorm=prenorm)
    y_ref, res_ref = normed if prenorm else (normed, None)
    expected = F.linear(y_ref, ref_leaves[3], ref_leaves[4])
    out, res = result if prenorm else (result, None)
    assert out.shape == (5, 12)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if prenorm:
        torch.testing.assert_close(res.double(), res_ref, atol=1e-6, rtol=1e-6)
    (out.double().sum() + (res.double().square().sum() if prenorm else 0)).backward()
    (expected.sum() + (res_ref.square().sum() if prenorm else 0)).backward()
    for t, t_ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad.double(), t_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_centered_weight_modules(backend):
    x = torch.randn(2, 3, 16, device=DEVICE)
    rms = RMSNorm(16, eps=1e-6, zero_centered_weight=True, backend=backend, device=DEVICE)
    ln = LayerNorm(16, eps=1e-5, zero_centered_weight=True, backend=backend, device=DEVICE)
    assert torch.all(rms.weight == 0) and torch.all(ln.weight == 0) and torch.all(ln.bias == 0)
    with torch.no_grad():
        rms.weight.normal_()
    torch.testing.assert_close(
        rms(x), F.rms_norm(x, (16,), 1 + rms.weight, 1e-6), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), eps=1e-5), atol=1e-5, rtol=1e-5)


def test_custom_op_registration_is_consistent():
    """Schema, fake tensors and autograd registration of the forward op, with every feature."""
    (x, w, b, r, x1, w1, b1), _ = _feature_inputs(5, 24, torch.float32, "parallel_outputs")
    x, r, x1, w, b, w1, b1 = _leaves(x, r, x1, w, b, w1, b1)
    seed = torch.tensor([3], device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    f32 = torch.float32
    # x, weight, bias, residual, x1, weight1, bias1, rowscale, seed, eps, dropout_p, is_rms_norm,
    # zero_centered_weight, out_dtype, residual_dtype, store_residual_out, store_dropout_mask,
    # prenorm
    for args in (
        (x, w, b, r, x1, w1, b1, None, seed, 1e-5, 0.1, False, True, f32, f32, True, True, True),
        (
            x,
            w,
            None,
            None,
            None,
            None,
            None,
            torch.rand(5, device=DEVICE),
            None,
            1e-5,
            0.0,
            True,
            False,
            torch.float16,
            f32,
            True,
            False,
            False,
        ),
    ):
        torch.library.opcheck(torch.ops.flash_attn.layer_norm_fwd.default, args, test_utils=checks)


def test_torch_compile_traces_the_triton_path():
    x, weight, bias, residual = _inputs(9, 40, torch.float32)

    def f(x, w, b, r):
        out, res = layer_norm_fn(x, w, b, r, dropout_p=0.25, prenorm=True, backend="triton")
        return rms_norm_fn(out, w, None, res, residual_in_fp32=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dy = torch.randn(9, 40, dtype=torch.float64, device=DEVICE)
    # The dropout seed is drawn inside the graph from torch's generator: same seed, same mask.
    torch.manual_seed(3)
    y, _, grads = _run_and_grads(compiled, _leaves(x, weight, bias, residual), dy, None)
    torch.manual_seed(3)
    y_ref, _, grads_ref = _run_and_grads(f, _leaves(x, weight, bias, residual), dy, None)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_module_loads_torch_state_dict(backend):
    torch_ln = torch.nn.LayerNorm(48, eps=1e-5, device=DEVICE)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    ours = LayerNorm(48, backend=backend, device=DEVICE)
    ours.load_state_dict(torch_ln.state_dict())
    x = torch.randn(2, 5, 48, device=DEVICE)
    torch.testing.assert_close(ours(x), torch_ln(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_module_loads_llama_state_dict(backend):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf_norm = llama.LlamaRMSNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        hf_norm.weight.normal_()
    ours = RMSNorm(48, eps=1e-6, backend=backend, device=DEVICE)
    ours.load_state_dict(hf_norm.state_dict())
    x = torch.randn(2, 5, 48, device=DEVICE)
    torch.testing.assert_close(ours(x), hf_norm(x), atol=1e-5, rtol=1e-5)


def test_modules_dropout_only_in_training_and_prenorm():
    norm = LayerNorm(
        32, dropout_p=0.5, prenorm=True, residual_in_fp32=True, backend="triton", device=DEVICE
    )
    x = torch.randn(4, 32, device=DEVICE)
    residual = torch.randn(4, 32, device=DEVICE)
    norm.eval()
    y, res = norm(x, residual)
    torch.testing.assert_close(res, x + residual)
    torch.testing.assert_close(y, F.layer_norm(x + residual, (32,), eps=1e-5))
    norm.train()
    _, res = norm(x, residual)
    assert (res == residual).any(), "training mode drops elements of x"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x = torch.randn(4, 8, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        layer_norm_fn(x, torch.ones(7, device=DEVICE), b, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_fn(x, w, torch.zeros(9, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="residual"):
        layer_norm_fn(x, w, b, torch.zeros(4, 9, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="eps"):
        layer_norm_fn(x, w, b, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        rms_norm_fn(x, w, None, eps=-1e-6, backend=backend)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            layer_norm_fn(x, w, b, dropout_p=p, backend=backend)
    with pytest.raises(TypeError, match="x"):
        layer_norm_fn(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), w, b, backend=backend)


def test_triton_rejects_fp64():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    w = torch.ones(8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        layer_norm_fn(x, w, None, backend="triton")
    # The torch path serves fp64.
    torch.testing.assert_close(
        layer_norm_fn(x, w, None, backend="torch"), F.layer_norm(x, (8,), w, None, 1e-6)
    )


_COMPILE_FOR_SM90 = """
from flash_attn.ops.layer_norm.triton.kernels import (
    _layer_norm_bwd_kernel, _layer_norm_fwd_kernel, _sum_partials_kernel)
from benchmarks.triton_compile import compile_for_gpu

h, f, i64, i32 = "*fp16", "*fp32", "i64", "i32"
fwd = dict(X=h, X1=h, R=f, W=h, B=h, W1=h, B1=h, Y=h, Y1=h, RESIDUAL_OUT=f, KEEP="*i1",
           KEEP1="*i1", RowScale=f, Mean=f, Rstd=f, Seed="*i64", stride_x_row=i64,
           stride_x1_row=i64, stride_r_row=i64, M=i32, N=i32, eps="fp32", dropout_p="fp32")
bwd = dict(X=f, W=h, W1=h, DY=h, DY1=h, DRESIDUAL_OUT=f, DX=h, DX1=h, DRESIDUAL=f, Partials=f,
           RowScale=f, Mean=f, Rstd=f, Seed="*i64", stride_x_row=i64, M=i32,
           N=i32, rows_per_program=i32, dropout_p="fp32")
# Plain fused norms, then every feature at once (parallel outputs, x1, zero-centred weights).
for rms, single, extra in ((False, True, False), (True, False, False), (False, True, True),
                           (True, False, True)):
    compile_for_gpu(_layer_norm_fwd_kernel, fwd, dict(
        IS_RMS_NORM=rms, HAS_X1=extra, HAS_RESIDUAL=True, HAS_ROWSCALE=not extra,
        HAS_BIAS=not rms, HAS_W1=extra, HAS_B1=extra, ZERO_CENTERED_WEIGHT=extra,
        HAS_DROPOUT=True, STORE_RESIDUAL_OUT=True, STORE_DROPOUT_MASK=extra,
        BLOCK_N=1024 if single else 4096, SINGLE_BLOCK=single))
    compile_for_gpu(_layer_norm_bwd_kernel, bwd, dict(
        IS_RMS_NORM=rms, HAS_W1=extra, HAS_X1=extra, HAS_ROWSCALE=not extra,
        ZERO_CENTERED_WEIGHT=extra, HAS_DROPOUT=True, HAS_DRESIDUAL_OUT=True,
        STORE_DRESIDUAL=True, BLOCK_N=1024 if single else 4096, SINGLE_BLOCK=single))
    compile_for_gpu(_sum_partials_kernel, dict(Partials=f, DW=h, DB=h, DW1=h, DB1=h, P=i32, N=i32),
                    dict(HAS_W1=extra, BLOCK_N=256))
print("compiled")
"""


def test_kernels_compile_for_gpu():
    """The interpreter accepts code the compiler rejects: compile to sm_90 (no GPU needed)."""
    assert_compiles_for_gpu(_COMPILE_FOR_SM90, timeout=300)


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_torch_path_applies_weight_and_bias_in_native_layer_norm():
    """Without residual, dropout or a second output, native_layer_norm normalises and applies
    weight and bias in one op: no separate multiply and add (3-5 ms of a CPU training step)."""
    x = torch.randn(6, 32, requires_grad=True)
    weight, bias = (torch.randn(32, requires_grad=True) for _ in "wb")
    with _AtenOps() as ops:
        out = layer_norm_fn(x, weight, bias, backend="torch")
    assert "native_layer_norm" in ops.names, ops.names
    assert not {"mul", "add", "mul_", "add_"} & set(ops.names), ops.names
    _check(
        "out",
        out,
        _plain(x, weight, bias, None, 1e-6, False),
        _plain(*(t.double() for t in (x, weight, bias)), None, 1e-6, False),
        torch.float32,
        n=32,
    )
