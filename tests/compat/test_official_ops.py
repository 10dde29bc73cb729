# ruff: noqa: E501 (the table holds the official signatures verbatim, one per line)
"""Code written for flash-attn 2.x runs unchanged on the fused norm, rotary and cross-entropy
paths: every official name imports from its official path with the official argument order
and defaults, and runs with positional arguments on both backends.

The signatures are those of flash-attn 2.8 (our keyword-only extensions such as ``backend=``
come after them and are not checked). ``LayerNorm`` has no official counterpart at this path;
it is checked against the official ``RMSNorm``'s interface, which it shares.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flash_attn.losses.cross_entropy import CrossEntropyLoss
from flash_attn.ops.cross_entropy.reference import cross_entropy_ref
from flash_attn.ops.rotary.reference import apply_rotary_ref
from flash_attn.ops.triton import cross_entropy as ce
from flash_attn.ops.triton import layer_norm as ln
from flash_attn.ops.triton.rotary import apply_rotary
from tests.testing import kernel_device, official_signature_test

LN = "flash_attn.ops.triton.layer_norm"
NORM_FN = "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False"
NORM_TAIL = "return_dropout_mask=False, out_dtype=None, out=None, residual_out=None"
NORM_REF = "x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0, rowscale=None, prenorm=False, zero_centered_weight=False, dropout_mask=None, dropout_mask1=None, upcast=False"
NORM_MODULE = (
    "hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None"
)
NORM_FORWARD = "x, residual=None, prenorm=False, residual_in_fp32=False"

OFFICIAL_SIGNATURES = [
    (LN, "layer_norm_fn", f"{NORM_FN}, is_rms_norm=False, {NORM_TAIL}"),
    (LN, "rms_norm_fn", f"{NORM_FN}, {NORM_TAIL}"),
    (
        LN,
        "layer_norm_linear_fn",
        "x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False, is_rms_norm=False",
    ),
    (LN, "layer_norm_ref", NORM_REF),
    (LN, "rms_norm_ref", NORM_REF),
    (LN, "RMSNorm.__init__", NORM_MODULE),
    (LN, "RMSNorm.forward", NORM_FORWARD),
    (LN, "LayerNorm.__init__", NORM_MODULE),
    (LN, "LayerNorm.forward", NORM_FORWARD),
    (
        "flash_attn.ops.triton.rotary",
        "apply_rotary",
        "x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False, inplace=False, conjugate=False",
    ),
    (
        "flash_attn.ops.triton.cross_entropy",
        "cross_entropy_loss",
        "logits, labels, precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0, ignore_index=-100, inplace_backward=False, process_group=None",
    ),
    (
        "flash_attn.losses.cross_entropy",
        "CrossEntropyLoss.__init__",
        "ignore_index=-100, reduction='mean', label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0, inplace_backward=False, process_group=None, return_z_loss=False",
    ),
    (
        "flash_attn.losses.cross_entropy",
        "CrossEntropyLoss.forward",
        "input, target, precomputed_lse=None",
    ),
]


test_official_name_and_signature = official_signature_test(OFFICIAL_SIGNATURES)


# -- behaviour: official positional order, both backends ------------------------------------------


@pytest.fixture(params=["torch", "triton"])
def device(request, monkeypatch):
    """Runs the test with FLASH_ATTN_BACKEND set, on the device that backend serves here."""
    monkeypatch.setenv("FLASH_ATTN_BACKEND", request.param)
    return kernel_device() if request.param == "triton" else "cpu"


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


def _norm_inputs(device, rows=6, hidden=16):
    x, residual, x1 = (torch.randn(rows, hidden, device=device) for _ in range(3))
    weight, bias, weight1, bias1 = (torch.randn(hidden, device=device) for _ in range(4))
    return x, weight, bias, residual, x1, weight1, bias1


def test_layer_norm_fn_parallel_outputs(device):
    x, w, b, residual, x1, w1, b1 = _norm_inputs(device)
    # x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm
    out, out1, res = ln.layer_norm_fn(x, w, b, residual, x1, w1, b1, 1e-5, 0.0, None, True)
    expected = ln.layer_norm_ref(x, w, b, residual, x1, w1, b1, 1e-5, 0.0, None, True)
    for got, ref in zip((out, out1, res), expected):
        _close(got, ref)
    _close(res, x + x1 + residual)
    _close(out, F.layer_norm(x + x1 + residual, (16,), w, b, 1e-5))


def test_rms_norm_fn_rowscale_zero_centered_and_masks(device):
    x, w, b, residual = _norm_inputs(device)[:4]
    rowscale = torch.rand(6, device=device)
    # ..., eps, dropout_p, rowscale, prenorm, residual_in_fp32, zero_centered_weight,
    # return_dropout_mask, out_dtype
    out, res, mask, mask1 = ln.rms_norm_fn(
        x,
        w,
        None,
        residual,
        None,
        None,
        None,
        1e-5,
        0.0,
        rowscale,
        True,
        True,
        True,
        True,
        torch.float16,
    )
    assert out.dtype == torch.float16 and res.dtype == torch.float32 and mask is mask1 is None
    h = x * rowscale[:, None] + residual
    _close(res, h)
    _close(out, F.rms_norm(h, (16,), w + 1, 1e-5), tol=2e-3)
    expected = ln.rms_norm_ref(
        x, w, None, residual, None, None, None, 1e-5, 0.0, rowscale, True, True
    )
    _close(out, expected[0], tol=2e-3)


def test_residual_keeps_its_dtype_with_residual_in_fp32(device):
    x, w, b = _norm_inputs(device)[:3]
    residual = torch.randn_like(x).half()
    _, res = ln.layer_norm_fn(
        x.half(), w.half(), b.half(), residual, prenorm=True, residual_in_fp32=True
    )
    assert res.dtype == torch.float16
    _, res = ln.layer_norm_fn(
        x.half(), w.half(), b.half(), None, prenorm=True, residual_in_fp32=True
    )
    assert res.dtype == torch.float32


def test_reference_upcast(device):
    x, w, b, residual = (t.half() for t in _norm_inputs(device)[:4])
    out, res = ln.layer_norm_ref(
        x, w, b, residual, None, None, None, 1e-5, 0.0, None, True, False, None, None, True
    )
    assert out.dtype == torch.float16 and res.dtype == torch.float32
    out, res = ln.layer_norm_ref(x, w, b, residual, prenorm=True)
    assert out.dtype == res.dtype == torch.float16


def test_layer_norm_linear_fn(device):
    x, w, b, residual = _norm_inputs(device)[:4]
    linear_weight, linear_bias = torch.randn(5, 16, device=device), torch.randn(5, device=device)
    out, res = ln.layer_norm_linear_fn(
        x, w, b, linear_weight, linear_bias, residual, 1e-5, True, False, False
    )
    normed = F.layer_norm(x + residual, (16,), w, b, 1e-5)
    _close(out, F.linear(normed, linear_weight, linear_bias), tol=1e-4)
    _close(res, x + residual)


@pytest.mark.parametrize("module_name", ["RMSNorm", "LayerNorm"])
def test_norm_modules(device, module_name):
    x, _, _, residual = _norm_inputs(device)[:4]
    module = getattr(ln, module_name)(16, 1e-5, 0.0, False, device, None)
    assert module.weight.shape == (16,)
    out, res = module(x, residual, True, True)
    _close(res, x + residual)
    h = x + residual
    expected = (
        F.rms_norm(h, (16,), eps=1e-5)
        if module_name == "RMSNorm"
        else F.layer_norm(h, (16,), eps=1e-5)
    )
    _close(out, expected)
    assert set(ln.RMSNorm(16).state_dict()) == {"weight"}
    zero_centered = getattr(ln, module_name)(16, 1e-5, 0.0, True, device)
    assert torch.all(zero_centered.weight == 0)
    _close(zero_centered(x), module(x))


def test_apply_rotary(device):
    cos, sin = torch.randn(12, 4, device=device), torch.randn(12, 4, device=device)
    x = torch.randn(2, 5, 3, 8, device=device)
    # x, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, interleaved, inplace, conjugate
    expected = apply_rotary_ref(x, cos, sin, 2, None, None, True, False, False)
    _close(apply_rotary(x, cos, sin, 2, None, None, True, False, False), expected)
    leaf = x.clone().requires_grad_()
    out = apply_rotary(leaf, cos, sin, 2, None, None, True, True, False)
    _close(leaf.detach(), expected)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape


def test_cross_entropy_loss_per_row(device):
    logits = torch.randn(7, 33, device=device, requires_grad=True)
    labels = torch.randint(0, 33, (7,), device=device)
    labels[0] = -100
    # logits, labels, precomputed_lse, label_smoothing, logit_scale, lse_square_scale,
    # ignore_index, inplace_backward, process_group
    losses, z_losses = ce.cross_entropy_loss(
        logits, labels, None, 0.1, 0.5, 1e-2, -100, False, None
    )
    assert losses.shape == z_losses.shape == (7,) and losses.dtype == torch.float32
    expected = cross_entropy_ref(logits.detach(), labels, 0.1, 1e-2, -100, "none", logit_scale=0.5)
    _close(losses, expected)
    lse = torch.logsumexp(0.5 * logits.detach(), -1)
    _close(z_losses, 1e-2 * lse.square() * (labels != -100))
    losses.sum().backward()
    assert logits.grad.shape == logits.shape and not z_losses.requires_grad


def test_cross_entropy_loss_module(device):
    logits = torch.randn(7, 33, device=device)
    labels = torch.randint(0, 33, (7,), device=device)
    # ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale, inplace_backward,
    # process_group, return_z_loss
    loss_fn = CrossEntropyLoss(-100, "mean", 0.1, 1.0, 0.0, False, None, True)
    loss, z_loss = loss_fn(logits, labels, None)
    _close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert z_loss.item() == 0.0
    _close(
        CrossEntropyLoss(reduction="none")(logits, labels),
        F.cross_entropy(logits, labels, reduction="none"),
    )
