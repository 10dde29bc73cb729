"""Bad input to the attention API gets a clear error naming the argument; backend selection."""

import subprocess
import sys

import pytest
import torch

from flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from flash_attn.ops import backend as backend_module
from flash_attn.ops.backend import resolve_backend


def qkv(batch=2, seqlen_q=8, seqlen_k=8, nheads=4, nheads_k=4, headdim=16, dtype=torch.float16):
    return (
        torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype),
        torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype),
        torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype),
    )


def _replace(index, tensor):
    def build():
        args = list(qkv())
        args[index] = tensor
        return args

    return build


BAD_INPUTS = [
    ("rank", _replace(0, torch.randn(8, 4, 16)), ValueError, "q must have 4 dimensions"),
    ("batch", lambda: [qkv()[0], *qkv(batch=3)[1:]], ValueError, "batch 2 like q"),
    ("headdim", lambda: [qkv()[0], *qkv(headdim=32)[1:]], ValueError, "headdim 16"),
    (
        "k vs v",
        _replace(2, torch.randn(2, 9, 4, 16, dtype=torch.float16)),
        ValueError,
        "k and v must have the same shape",
    ),
    ("gqa", lambda: qkv(nheads=4, nheads_k=3), ValueError, "divisible"),
    ("headdim > 256", lambda: qkv(headdim=264), ValueError, "at most 256"),
    ("int dtype", _replace(0, torch.ones(2, 8, 4, 16, dtype=torch.int32)), TypeError, "q must be"),
    ("mixed dtype", _replace(2, torch.randn(2, 8, 4, 16)), TypeError, "v has dtype"),
    ("not a tensor", _replace(1, [1, 2]), TypeError, "k must be a torch.Tensor"),
    (
        "last dim stride",
        _replace(0, torch.randn(2, 8, 4, 32, dtype=torch.float16)[..., ::2]),
        ValueError,
        "contiguous in its last dimension",
    ),
    ("empty", lambda: qkv(seqlen_k=0), ValueError, "empty dimension"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name,build,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected(backend, name, build, error, message):
    with pytest.raises(error, match=message):
        flash_attn_func(*build(), backend=backend)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5])
def test_dropout_p_out_of_range(dropout_p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        flash_attn_func(*qkv(), dropout_p=dropout_p)


def test_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        flash_attn_func(q, k.to("meta"), v.to("meta"))


def test_packed_shapes_are_checked():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3"):
        flash_attn_qkvpacked_func(torch.randn(2, 8, 2, 4, 16))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen_k, 2"):
        flash_attn_kvpacked_func(torch.randn(2, 8, 4, 16), torch.randn(2, 8, 3, 4, 16))


BAD_OPTIONS = [
    (dict(window_size=(-2, 0)), ValueError, "window_size must be two integers >= -1"),
    (dict(window_size=(1,)), ValueError, "window_size"),
    (dict(window_size=None), TypeError, "window_size must be a pair"),
    (dict(window_size=(2.5, 0)), TypeError, "window_size must be two integers"),
    (dict(window_size=torch.tensor([2.5, 0])), TypeError, "window_size must be two integers"),
    (dict(window_size=torch.tensor([1, 2, 3])), ValueError, "window_size must be two integers"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(causal="no"), TypeError, "causal must be a bool"),
    (dict(causal=2), TypeError, "causal must be a bool"),
    (dict(deterministic="yes"), TypeError, "deterministic must be a bool"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (
        dict(alibi_slopes=torch.ones(4, dtype=torch.float16)),
        TypeError,
        "alibi_slopes must be float32",
    ),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(4,\)"),
    (dict(attn_bias=torch.zeros(3, 8, 8)), ValueError, "attn_bias must broadcast"),
    (dict(attn_bias=torch.zeros(8, 9)), ValueError, "attn_bias must broadcast"),
    (dict(attn_bias=torch.zeros(8, 8, dtype=torch.int64)), TypeError, "attn_bias must be a float"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_OPTIONS, ids=lambda x: str(x)[:30])
def test_bad_options_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        flash_attn_func(*qkv(), **kwargs)


WINDOW_FORMS = {
    "0d_tensors": lambda: (torch.tensor(3), torch.tensor(0)),  # as a config may hold it
    "1d_tensor": lambda: torch.tensor([3, 0]),  # as the official tests pass it
    "list": lambda: [3, 0],
}


@pytest.mark.parametrize("form", WINDOW_FORMS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_window_forms_and_integer_flags_are_accepted(backend, form):
    """window_size as any pair the official functions accept, causal as 0 or 1."""
    from flash_attn import flash_attn_with_kvcache

    q, k, v = qkv(dtype=torch.float32)
    window = WINDOW_FORMS[form]()
    expected = flash_attn_func(q, k, v, causal=True, window_size=(3, 0), backend=backend)
    out = flash_attn_func(q, k, v, causal=1, window_size=window, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cached = flash_attn_with_kvcache(
        q, k, v, cache_seqlens=8, causal=True, window_size=window, backend=backend
    )
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)


def test_bad_paged_varlen_input_is_rejected():
    q, cu = torch.randn(10, 2, 16), torch.tensor([0, 4, 10], dtype=torch.int32)
    pages = torch.randn(3, 4, 2, 16)
    table = torch.tensor([[0], [1]], dtype=torch.int32)  # one page of 4 keys each
    with pytest.raises(RuntimeError, match="block_table is too short"):
        flash_attn_varlen_func(q, pages, pages, cu, cu, 6, 6, block_table=table)
    with pytest.raises(ValueError, match=r"block_table must be an int32 tensor of shape \(2,"):
        flash_attn_varlen_func(q, pages, pages, cu, cu, 6, 6, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table values must be in \[0, 3\)"):
        flash_attn_varlen_func(q, pages, pages, cu, cu, 6, 6, block_table=table.repeat(1, 2) + 2)
    with pytest.raises(ValueError, match="k and v must be paged caches"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, block_table=table)


def test_bad_varlen_input_is_rejected():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (dict(cu_seqlens_q=cu.long()), ValueError, "cu_seqlens_q must be int32"),
        (
            dict(cu_seqlens_k=torch.tensor([0, 6, 4, 10], dtype=torch.int32)),
            ValueError,
            "same length",
        ),
        (
            dict(cu_seqlens_q=torch.tensor([0, 7, 3], dtype=torch.int32)),
            ValueError,
            "non-decreasing",
        ),
        (
            dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)),
            ValueError,
            "must end at the number of tokens",
        ),
        (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q \(5\) is smaller"),
        (dict(max_seqlen_k=0), ValueError, "max_seqlen_k must be a positive int"),
    ]
    for override, error, message in cases:
        kwargs = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6)
        kwargs.update(override)
        with pytest.raises(error, match=message):
            flash_attn_varlen_func(q, q, q, **kwargs)
    with pytest.raises(ValueError, match=r"q must have 3 dimensions \(total_tokens"):
        flash_attn_varlen_func(q[None], q, q, cu, cu, 6, 6)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter serves CPU tensors
    monkeypatch.setenv("FLASH_ATTN_BACKEND", "triton")
    assert resolve_backend(None, cpu) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot serve this input"):
        resolve_backend("triton", cpu)
    monkeypatch.setattr(backend_module, "_TRITON_IMPORTS", False)
    with pytest.raises(ValueError, match="Triton is not installed"):
        resolve_backend("triton", torch.device("cuda"))


def test_env_override_selects_backend(monkeypatch):
    q, k, v = qkv(dtype=torch.float32)
    monkeypatch.setenv("FLASH_ATTN_BACKEND", "triton")
    _, lse_triton, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    monkeypatch.setenv("FLASH_ATTN_BACKEND", "torch")
    _, lse_torch, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    torch.testing.assert_close(lse_triton, lse_torch)
    monkeypatch.setenv("FLASH_ATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attn_func(q, k, v)


def test_import_and_cpu_path_without_triton(tmp_path):
    """With triton unimportable (no wheels for macOS or Windows), flash_attn, its models and
    the fused ops import, and the torch backend works."""
    blocker = tmp_path / "triton"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('triton blocked for this test')\n")
    code = (
        "import torch, flash_attn\n"
        "import flash_attn.models.gpt, flash_attn.ops.cross_entropy, flash_attn.ops.mlp\n"
        "import flash_attn.ops.linear_cross_entropy, flash_attn.ops.rotary\n"
        "from flash_attn.ops.layer_norm import layer_norm_fn\n"
        "from flash_attn.ops.backend import triton_available\n"
        "assert not triton_available()\n"
        "q = torch.randn(1, 5, 2, 8)\n"
        "out = flash_attn.flash_attn_func(q, q, q, causal=True)\n"
        "assert out.shape == q.shape\n"
        "assert layer_norm_fn(q, torch.ones(8), None).shape == q.shape\n"
        "try:\n"
        "    flash_attn.flash_attn_func(q, q, q, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'Triton is not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected an error')\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
