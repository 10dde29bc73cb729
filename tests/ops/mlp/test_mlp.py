"""Fused linear + activation, gated linear and the MLP modules against PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flash_attn.modules.mlp import FusedMLP, GatedMlp
from flash_attn.ops.mlp import ACTIVATIONS, fused_mlp, gated_linear, linear_activation
from flash_attn.ops.mlp.reference import gated_linear_ref, linear_activation_ref
from tests.testing import HAS_CUDA, assert_compiles_for_gpu, kernel_device

BACKENDS = ["triton", "torch"]
SMALL = [(7, 1, 7), (13, 7, 1), (1, 33, 257), (9, 1000, 33)]  # (tokens, in_features, out)
# Odd large sizes under the interpreter, for a few activations only to keep the file fast.
LARGE = [(5, 7, 4099), (3, 4099, 9)]
CASES = [(a, s) for a in ACTIVATIONS for s in SMALL] + [
    (a, s) for a in ("gelu_approx", "silu") for s in LARGE
]


def _device(backend):
    return kernel_device() if backend == "triton" else "cpu"


def _inputs(tokens, in_features, out_rows, dtype, device, bias=True):
    x = torch.randn(tokens, in_features)
    weight = torch.randn(out_rows, in_features) * in_features**-0.5
    b = torch.randn(out_rows) * 0.5 if bias else None
    return [t if t is None else t.to(dtype=dtype, device=device) for t in (x, weight, b)]


def _run(fn, tensors, activation, dout=None, **kw):
    """Output and the gradients of every tensor input for a fixed random upstream gradient."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, activation, **kw)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(dout.to(dtype=out.dtype, device=out.device))
    return [out.detach()] + [t.grad for t in leaves if t is not None], dout


def _errs(got, ref):
    return [(a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(got, ref)]


def _check_within_twice_plain(fn, ref_fn, tensors, activation, backend, atol):
    oracle, dout = _run(ref_fn, [t.double() for t in tensors], activation)
    plain, _ = _run(ref_fn, tensors, activation, dout)
    got, _ = _run(fn, tensors, activation, dout, backend=backend)
    # A sum of n fp32 terms rounds differently on different CPUs (summation order), with an error
    # that grows like sqrt(n) * eps(fp32). n behind each output: in_features for out, the weight's
    # rows for x's gradient, the tokens for the weight and bias gradients.
    (tokens, in_features), rows = tensors[0].shape, tensors[1].shape[0]
    lengths = dict(out=in_features, x=rows, weight=tokens, bias=tokens)
    for name, err, budget in zip(lengths, _errs(got, oracle), _errs(plain, oracle)):
        grown_atol = atol + torch.finfo(torch.float32).eps * lengths[name] ** 0.5
        assert err <= 2 * budget + grown_atol, name
    assert got[0].dtype == tensors[0].dtype


# The torch backend is the reference itself: the kernels are what these two tests measure.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation, shape", CASES)
def test_linear_activation_within_twice_plain_pytorch_error(dtype, activation, shape):
    tokens, in_features, out_features = shape
    tensors = _inputs(tokens, in_features, out_features, dtype, kernel_device())
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    _check_within_twice_plain(
        linear_activation, linear_activation_ref, tensors, activation, "triton", atol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation, shape", CASES)
def test_gated_linear_within_twice_plain_pytorch_error(dtype, activation, shape):
    tokens, in_features, hidden = shape
    tensors = _inputs(tokens, in_features, 2 * hidden, dtype, kernel_device())
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    _check_within_twice_plain(gated_linear, gated_linear_ref, tensors, activation, "triton", atol)


BUILTINS = {
    "gelu": F.gelu,
    "gelu_approx": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
    "sqrelu": lambda y: torch.square(F.relu(y)),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_f_linear_plus_activation_on_strided_3d_input(backend, activation):
    device = _device(backend)
    x = torch.randn(2, 24, 5, device=device).transpose(1, 2)  # (2, 5, 24), not contiguous
    weight = torch.randn(40, 24, device=device) * 0.3
    bias = torch.randn(40, device=device)
    (got, *got_grads), dout = _run(
        lambda x, w, b, a, **kw: linear_activation(x, w, b, a, **kw),
        [x, weight, bias],
        activation,
        backend=backend,
    )
    (ref, *ref_grads), _ = _run(
        lambda x, w, b, a: BUILTINS[a](F.linear(x, w, b)), [x, weight, bias], activation, dout
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The gated kernel against the official GatedMlp formula.
    up, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    torch.testing.assert_close(
        gated_linear(x, weight, bias, activation, backend=backend),
        up * BUILTINS[activation](gate),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_frozen_weight_and_inference(backend):
    device = _device(backend)
    x, weight, _ = _inputs(6, 10, 12, torch.float32, device, bias=False)
    xg = x.clone().requires_grad_()
    linear_activation(xg, weight, None, "sqrelu", backend=backend).sum().backward()
    xr = x.clone().requires_grad_()
    F.relu(xr @ weight.t()).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    with torch.no_grad():
        out = gated_linear(x, weight, None, "silu", backend=backend)
    up, gate = (x @ weight.t()).chunk(2, -1)
    torch.testing.assert_close(out, up * F.silu(gate))


class _PlainMlp(nn.Module):
    """The unfused model that the fused modules must stay checkpoint-compatible with."""

    def __init__(self, d_in, d_hidden, d_out, fc1_out, act, gated):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, fc1_out), nn.Linear(d_hidden, d_out)
        self.act, self.gated = act, gated

    def forward(self, x):
        y = self.fc1(x)
        if self.gated:
            up, gate = y.chunk(2, dim=-1)
            return self.fc2(up * BUILTINS[self.act](gate))
        return self.fc2(BUILTINS[self.act](y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_modules_load_plain_linear_state_dicts(backend, gated):
    device = _device(backend)
    if gated:
        fused = GatedMlp(24, 20, 8, activation="gelu", backend=backend).to(device)
        plain = _PlainMlp(24, 20, 8, 40, "gelu", True).to(device)
    else:
        fused = FusedMLP(24, 20, 8, activation="relu", backend=backend).to(device)
        plain = _PlainMlp(24, 20, 8, 20, "relu", False).to(device)
    fused.load_state_dict(plain.state_dict())  # strict: same keys and shapes
    assert set(fused.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    x = torch.randn(3, 5, 24, device=device)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_module_defaults_and_residual():
    mlp = FusedMLP(16, return_residual=True, bias2=False)
    assert mlp.fc1.weight.shape == (64, 16) and mlp.fc2.bias is None
    x = torch.randn(2, 16)
    out, residual = mlp(x)
    assert out.shape == (2, 16) and residual is x
    gated = GatedMlp(48)  # 8/3 * 48 = 128, already a multiple of 128
    assert gated.fc1.weight.shape == (256, 48) and gated.fc2.weight.shape == (48, 128)
    assert "activation='silu'" in repr(gated)


def test_torch_compile_traces_triton_path():
    device = kernel_device()
    mlp = GatedMlp(16, 24, 16, activation="silu", backend="triton").to(device)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x1)
    out.sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    ref = mlp(x2)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    for a, p in zip(grads, mlp.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_custom_op_registration_is_consistent():
    device = kernel_device()
    x, weight, bias = _inputs(5, 12, 16, torch.float32, device)
    for gated in (False, True):
        torch.library.opcheck(
            torch.ops.flash_attn.linear_act_fwd.default,
            (
                x.requires_grad_(),
                weight.requires_grad_(),
                bias.requires_grad_(),
                "gelu",
                gated,
                True,
            ),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs CUDA (the interpreter mishandles bf16)")
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_cuda(gated):
    tensors = _inputs(300, 256, 2 * 520 if gated else 520, torch.bfloat16, "cuda")
    fn, ref = (
        (gated_linear, gated_linear_ref) if gated else (linear_activation, linear_activation_ref)
    )
    _check_within_twice_plain(fn, ref, tensors, "gelu_approx", "triton", 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    device = _device(backend)
    x, weight, bias = _inputs(4, 6, 10, torch.float32, device)
    with pytest.raises(ValueError, match="activation"):
        linear_activation(x, weight, bias, "swish", backend=backend)
    with pytest.raises(ValueError, match="in_features"):
        linear_activation(x[:, :5], weight, bias, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        linear_activation(x, weight, bias[:9], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        linear_activation(x.double(), weight, bias, backend=backend)
    with pytest.raises(TypeError, match="x"):
        linear_activation(x.long(), weight, bias, backend=backend)
    with pytest.raises(ValueError, match="odd"):
        gated_linear(x, weight[:9], None, backend=backend)
    with pytest.raises(ValueError, match="fc2_weight"):
        fused_mlp(x, weight, bias, torch.randn(3, 7, device=device), None, backend=backend)
    with pytest.raises(ValueError, match="activation"):
        FusedMLP(6, activation="swish")


_COMPILE_FOR_SM90 = """
import sys
from flash_attn.ops.mlp.triton.kernels import _act_bwd_kernel, _linear_act_fwd_kernel
from benchmarks.triton_compile import compile_for_gpu

every = sys.argv[1] == "all"
cases = [(dt, act, gated) for dt in ("bf16", "fp16", "fp32")
         for act in ("gelu", "gelu_approx", "relu", "sqrelu", "silu", "sigmoid")
         for gated in (False, True)]
if not every:
    cases = [("bf16", "gelu", True), ("fp32", "sqrelu", False), ("fp16", "silu", True)]
for dt, act, gated in cases:
    # compile_for_gpu unwraps the autotuner and compiles one of its configurations.
    compile_for_gpu(_linear_act_fwd_kernel,
        dict(X=f"*{dt}", W=f"*{dt}", Bias=f"*{dt}", Out=f"*{dt}", Pre=f"*{dt}", M="i32",
             N="i32", K="i32", stride_xm="i64", stride_xk="i64", stride_wn="i64",
             stride_wk="i64"),
        dict(ACTIVATION=act, GATED=gated, HAS_BIAS=True, STORE_PRE=True,
             DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
             BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8))
    compile_for_gpu(_act_bwd_kernel,
        dict(DOut=f"*{dt}", Pre=f"*{dt}", DPre=f"*{dt}", M="i32", N="i32"),
        dict(ACTIVATION=act, GATED=gated, BLOCK_M=32, BLOCK_N=128))
print("compiled")
"""


@pytest.mark.parametrize("which", ["some", pytest.param("all", marks=pytest.mark.slow)])
def test_kernels_compile_for_gpu(which):
    """The interpreter accepts code the compiler rejects: compile to sm_90 (no GPU needed)."""
    assert_compiles_for_gpu(_COMPILE_FOR_SM90, which)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_runs_in_its_dtype_like_nn_linear(backend):
    """Mixed precision: fp32 parameters, fp16 compute, as nn.Linear under autocast."""
    device = kernel_device() if backend == "triton" else "cpu"
    mlp = GatedMlp(64, hidden_features=96, activation="silu", backend=backend).to(device)
    x = torch.randn(5, 64, device=device, requires_grad=True)
    with torch.autocast(device.split(":")[0], dtype=torch.float16):
        out = mlp(x)
        expected = gated_linear_ref(x.half(), mlp.fc1.weight.half(), mlp.fc1.bias.half(), "silu")
        expected = F.linear(expected, mlp.fc2.weight.half(), mlp.fc2.bias.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    out.float().sum().backward()
    assert mlp.fc1.weight.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
