# ruff: noqa: E501 (one case a line)
"""Bad arguments to the fused ops' functional APIs: a TypeError or ValueError that names the
argument, on the PyTorch backend (the checks run before any backend is chosen)."""

from __future__ import annotations

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_with_kvcache
from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.cross_entropy import cross_entropy_loss
from flash_attn.ops.layer_norm import layer_norm_fn, rms_norm_fn
from flash_attn.ops.layer_norm.reference import layer_norm_ref
from flash_attn.ops.linear_cross_entropy import linear_cross_entropy
from flash_attn.ops.mlp import fused_mlp
from flash_attn.ops.rotary import apply_rotary
from tests.bad_inputs.bad_inputs_testing import assert_rejected

x = torch.randn(4, 8)
w = torch.ones(8)
logits = torch.randn(4, 10)
labels = torch.tensor([1, 2, 3, 4])
q = torch.randn(2, 5, 2, 8)
cos, sin = torch.randn(16, 4), torch.randn(16, 4)

LAYER_NORM_CASES = [
    (lambda: layer_norm_fn(x, torch.ones(7), None), ValueError, "weight"),
    (lambda: layer_norm_fn(x, w, None, eps=-1.0), ValueError, "eps"),
    (lambda: layer_norm_fn(x, w, None, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda: layer_norm_fn(x, w, None, residual=torch.randn(4, 7)), ValueError, "residual"),
    (lambda: layer_norm_fn(x.long(), w, None), TypeError, "x"),
    (lambda: rms_norm_fn(x, w, None, backend="gpu"), ValueError, "backend"),
    (lambda: rms_norm_fn(x, w, None, rowscale=torch.ones(3)), ValueError, "rowscale"),
    (lambda: layer_norm_fn(x, w, None, out=torch.empty(4, 8, dtype=torch.int64)), TypeError, "out"),
    (lambda: layer_norm_fn(x, w, None, out=torch.empty(4, 7)), ValueError, "out"),
    (
        lambda: layer_norm_fn(x, w, None, residual=x, prenorm=True, residual_out=torch.empty(2, 8)),
        ValueError,
        "residual_out",
    ),
    (
        lambda: layer_norm_ref(
            x, w, None, dropout_p=0.5, dropout_mask=torch.ones(4, 7, dtype=torch.bool)
        ),
        ValueError,
        "dropout_mask",
    ),
    (
        lambda: layer_norm_ref(
            x, w, None, x1=x, dropout_p=0.5, dropout_mask1=torch.ones(8, dtype=torch.bool)
        ),
        ValueError,
        "dropout_mask1",
    ),
    (
        lambda: layer_norm_ref(x, w, None, dropout_p=0.5, dropout_mask=torch.ones(4, 8)),
        TypeError,
        "dropout_mask",
    ),
]
ROTARY_CASES = [
    (lambda: apply_rotary(q, cos[:, :3], sin), ValueError, "sin"),
    (lambda: apply_rotary(q, torch.randn(16, 6), torch.randn(16, 6)), ValueError, "rotary_dim"),
    (lambda: apply_rotary(q, cos[:3], sin[:3]), ValueError, "cos"),
    (lambda: apply_rotary(q[0], cos, sin), ValueError, "x"),
    (lambda: apply_rotary(q, cos, sin, cu_seqlens=torch.tensor([0, 5])), ValueError, "x"),
]
CROSS_ENTROPY_CASES = [
    (lambda: cross_entropy_loss(logits, labels.float()), TypeError, "labels"),
    (lambda: cross_entropy_loss(logits, labels[:3]), ValueError, "labels"),
    (
        lambda: cross_entropy_loss(logits, labels, label_smoothing=1.5),
        ValueError,
        "label_smoothing",
    ),
    (
        lambda: cross_entropy_loss(logits, labels, lse_square_scale=-1.0),
        ValueError,
        "lse_square_scale",
    ),
    (lambda: cross_entropy_loss(logits, labels, reduction="avg"), ValueError, "reduction"),
    (lambda: cross_entropy_loss(logits, labels, logit_scale="2"), TypeError, "logit_scale"),
    (
        lambda: cross_entropy_loss(logits, labels, label_smoothing="0.1"),
        TypeError,
        "label_smoothing",
    ),
    (lambda: cross_entropy_loss(logits, labels, process_group="x"), TypeError, "process_group"),
    (
        lambda: cross_entropy_loss(
            logits, labels, precomputed_lse=torch.ones(4, dtype=torch.int64)
        ),
        TypeError,
        "precomputed_lse",
    ),
    (lambda: cross_entropy_loss(logits, torch.tensor([1, 2, 3, 99])), ValueError, "label"),
    (lambda: cross_entropy_loss(logits[0], labels[:1]), ValueError, "logits"),
    (lambda: linear_cross_entropy(x, torch.randn(10, 7), labels), ValueError, "weight"),
    (
        lambda: linear_cross_entropy(x, torch.randn(10, 8), labels, chunk_size=0),
        ValueError,
        "chunk_size",
    ),
    (
        lambda: linear_cross_entropy(x, torch.randn(10, 8), labels, lse_square_scale=-1.0),
        ValueError,
        "lse_square_scale",
    ),
]
MLP_CASES = [
    (
        lambda: fused_mlp(x, torch.randn(16, 7), None, torch.randn(8, 16), None),
        ValueError,
        "weight",
    ),
    (
        lambda: fused_mlp(
            x, torch.randn(16, 8), None, torch.randn(8, 16), None, activation="swish9"
        ),
        ValueError,
        "activation",
    ),
]


@pytest.mark.parametrize(
    "call, error, name", LAYER_NORM_CASES + ROTARY_CASES + CROSS_ENTROPY_CASES + MLP_CASES
)
def test_fused_op_rejects(call, error, name):
    assert_rejected(call, error, name)


def _bf16(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.bfloat16) for t in tensors]


BF16_ON_THE_INTERPRETER = {
    "attention": lambda: flash_attn_func(*_bf16(q, q, q), backend="triton"),
    "kvcache": lambda: flash_attn_with_kvcache(*_bf16(q, q, q), backend="triton"),
    "layer_norm": lambda: layer_norm_fn(*_bf16(x, w), None, backend="triton"),
    "rotary": lambda: apply_rotary(*_bf16(q, cos, sin), backend="triton"),
    "cross_entropy": lambda: cross_entropy_loss(*_bf16(logits), labels, backend="triton"),
    "linear_cross_entropy": lambda: linear_cross_entropy(
        *_bf16(x, torch.randn(10, 8)), labels, backend="triton"
    ),
    "mlp": lambda: fused_mlp(
        *_bf16(x, torch.randn(16, 8)), None, *_bf16(torch.randn(8, 16)), None, backend="triton"
    ),
}


@pytest.mark.skipif(not interpreter_enabled(), reason="the Triton interpreter is off")
@pytest.mark.parametrize("op", BF16_ON_THE_INTERPRETER)
def test_bf16_is_refused_on_the_interpreter(op):
    """The interpreter computes bf16 products wrongly: every op says so instead of answering."""
    with pytest.raises(ValueError, match="bfloat16.*interpreter.*float16 or float32.*'torch'"):
        BF16_ON_THE_INTERPRETER[op]()
