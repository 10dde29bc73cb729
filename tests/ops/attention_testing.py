"""Shared helpers of the attention tests: inputs, forward+backward, the official criterion.

Criterion: the error of ours against an fp64 reference is at most twice the error of plain
PyTorch at the same precision, plus a tiny atol.
"""

import typing

import torch

from tests.testing import kernel_device

BACKENDS = ["triton", "torch"]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def device_and_dtypes(backend):
    """Where a backend runs in this session, and the dtypes to test there."""
    device = kernel_device() if backend == "triton" else "cpu"
    dtypes = [torch.float32, torch.float16]
    if device == "cuda":
        dtypes.append(torch.bfloat16)
    return device, dtypes


def make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device):
    """q (B, Sq, H, D), k and v (B, Sk, Hk, D), requiring grad."""
    q = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device)
    return [t.requires_grad_() for t in (q, k, v)]


def forward_backward(fn, tensors, dout):
    """Run fn(*tensors) -> out on detached leaf copies; return (out, grad of each tensor that
    requires grad)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return (out.detach(), *(t.grad for t in leaves if t.requires_grad))


def assert_within_criterion(ours, ref, plain, dtype, name):
    """|ours - ref| <= 2 |plain - ref| + atol, in max norm."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert err <= 2 * plain_err + ATOL[dtype], (
        f"{name}: error {err:.3g} > 2 x plain PyTorch error {plain_err:.3g} + {ATOL[dtype]}"
    )


def compare(ours_fn, reference_at, tensors, dout, dtype, name):
    """Output and gradients of ours_fn against reference_at(torch.float64) within the criterion,
    reference_at(dtype) giving plain PyTorch's error."""
    ref = forward_backward(reference_at(torch.float64), tensors, dout.double())
    plain = forward_backward(reference_at(dtype), tensors, dout)
    ours = forward_backward(ours_fn, tensors, dout)
    names = ["out"] + [f"grad{i}" for i in range(len(ours) - 1)]
    for label, o, r, p in zip(names, ours, ref, plain):
        assert_within_criterion(o, r, p, dtype, f"{name} {label}")


# Triton types of the fields of Scoring, by their annotations (stride_bias: (b, h, m, n)).
_SCALAR_TYPES = {tuple: ("i32",) * 4, int: "i32", float: "fp32"}


def kernel_arg_types(kernel, dtype: str = "fp16") -> dict:
    """Triton types of the runtime arguments of an attention kernel, for
    :func:`benchmarks.triton_compile.compile_for_gpu`: q, k, v and the outputs in
    ``dtype``, the rest as the launchers pass them (see ``kernel_constants``)."""
    from flash_attn.ops.attention.triton.forward import Scoring
    from flash_attn.ops.launch import unwrap_jit

    strides = ("i32",) * 3
    special = {
        "Lse": "*fp32",
        "Delta": "*fp32",
        "DBias": "*fp32",
        "DQAccum": "*fp32",
        "Seed": "*i64",
        "KBatchIdx": "*i32",
        "BlockTable": "*i32",
        "CuSeqlensQ": "*i32",
        "dropout_p": "fp32",
        "stride_lse": ("i32",) * 2,
        "CuSeqlensK": "*i32",
        "SeqlensK": "*i32",
        "Seqlens": "*i32",  # the cache update's lengths, rows, left padding and key ranges
        "Rows": "*i32",
        "Leftpad": "*i32",
        "KeyRanges": "*i32",
        "Slopes": "*fp32",
        "scoring": Scoring(*(_SCALAR_TYPES[t] for t in typing.get_type_hints(Scoring).values())),
    }
    types = {}
    for name in unwrap_jit(kernel).arg_names:
        if name in special:
            types[name] = special[name]
        elif name.startswith("stride_") and name.count("_") == 1:  # stride_q, stride_k, ...
            types[name] = strides
        else:  # other pointers are q, k, v or outputs; the rest are sizes and strides
            types[name] = f"*{dtype}" if name[0].isupper() else "i32"
    return types
