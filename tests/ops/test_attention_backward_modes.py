"""The two schedules of the Triton backward (see ``flash_attn/ops/attention/triton/backward.py``):
``deterministic=False`` sums dQ with atomic adds, ``deterministic=True`` in a second pass. Both
against the fp64 reference with the official criterion, with every score modifier, varlen and
GQA; the deterministic one bit for bit the same from run to run."""

import pytest
import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func
from flash_attn.ops.attention.reference import attention_ref
from tests.ops.attention_testing import compare, forward_backward, make_inputs
from tests.testing import kernel_device

MODES = [False, True]  # deterministic
# Every score modifier at once, with GQA and lengths that are no multiple of a block.
OPTIONS = dict(causal=True, window_size=(30, -1), softcap=4.0)


def _varlen_batch(dtype, device, lengths_q=(1, 70, 33), lengths_k=(7, 70, 90)):
    """Packed q (total_q, 4, 24), k and v (total_k, 2, 24) requiring grad, cu_seqlens_q/_k."""
    offsets = [
        torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
        for n in (lengths_q, lengths_k)
    ]
    q = torch.randn(sum(lengths_q), 4, 24, dtype=dtype, device=device)
    k, v = (torch.randn(sum(lengths_k), 2, 24, dtype=dtype, device=device) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)], *offsets


@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_modifier_and_the_bias_gradient_within_the_criterion(deterministic, dtype):
    device = kernel_device()
    q, k, v = make_inputs(2, 64, 80, 4, 2, 16, dtype, device)
    bias = torch.randn(1, 4, 64, 80, dtype=dtype, device=device).requires_grad_()
    slopes = torch.rand(4, device=device)
    dout = torch.randn_like(q)

    def ours(q, k, v, bias):
        return flash_attn_func(
            q,
            k,
            v,
            alibi_slopes=slopes,
            attn_bias=bias,
            deterministic=deterministic,
            backend="triton",
            **OPTIONS,
        )

    def reference_at(precision):
        def run(q, k, v, bias):
            q, k, v, bias = (t.to(precision) for t in (q, k, v, bias))
            return attention_ref(q, k, v, alibi_slopes=slopes, attn_bias=bias, **OPTIONS)[0]

        return run

    compare(ours, reference_at, (q, k, v, bias), dout, dtype, f"deterministic={deterministic}")


@pytest.mark.parametrize("deterministic", MODES)
def test_varlen_with_gqa_equals_each_sequence_alone(deterministic):
    device = kernel_device()
    (q, k, v), cu_q, cu_k = _varlen_batch(torch.float32, device)
    dout = torch.randn_like(q)
    packed = forward_backward(
        lambda q, k, v: flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 70, 90, causal=True, deterministic=deterministic, backend="triton"
        ),
        (q, k, v),
        dout,
    )
    for b in range(len(cu_q) - 1):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        alone = forward_backward(
            lambda q, k, v: attention_ref(q, k, v, causal=True)[0],
            (q[None, sq].double(), k[None, sk].double(), v[None, sk].double()),
            dout[None, sq].double(),
        )
        for name, p, a in zip(["out", "dq", "dk", "dv"], packed, alone):
            rows = sq if name in ("out", "dq") else sk
            torch.testing.assert_close(
                p[rows].double(), a[0], rtol=1e-4, atol=1e-5, msg=f"sequence {b} {name}"
            )


def test_deterministic_backward_is_bit_reproducible_with_varlen_gqa_bias_and_dropout():
    device = kernel_device()
    (q, k, v), cu_q, cu_k = _varlen_batch(torch.float16, device)
    bias = torch.randn(3, 4, 70, 90, dtype=torch.float16, device=device).requires_grad_()
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(
            forward_backward(
                lambda q, k, v, bias: flash_attn_varlen_func(
                    q,
                    k,
                    v,
                    cu_q,
                    cu_k,
                    70,
                    90,
                    dropout_p=0.2,
                    causal=True,
                    attn_bias=bias,
                    deterministic=True,
                    backend="triton",
                ),
                (q, k, v, bias),
                dout,
            )
        )
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], *runs):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_the_two_schedules_agree_up_to_the_order_of_summation():
    device = kernel_device()
    q, k, v = make_inputs(1, 90, 90, 4, 1, 32, torch.float32, device)
    dout = torch.randn_like(q)
    grads = [
        forward_backward(
            lambda q, k, v, mode=mode: flash_attn_func(
                q, k, v, window_size=(20, 10), deterministic=mode, backend="triton"
            ),
            (q, k, v),
            dout,
        )
        for mode in MODES
    ]
    # dK and dV are summed in the same order; dQ over 4 key blocks, in a different one.
    for name, atomic, ordered in zip(["out", "dq", "dk", "dv"], *grads):
        exact = name != "dq"
        tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(atomic, ordered, **tolerance, msg=name)
