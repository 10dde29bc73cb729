"""Helpers shared by the tests (import as ``from tests.testing import ...``).

``tests/conftest.py`` sets TRITON_INTERPRET before anything imports flash_attn.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = str(Path(__file__).resolve().parents[1])  # the checkout: flash_attn/, benchmarks/
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "1") not in ("", "0")


def kernel_device() -> str:
    """Device on which the Triton kernels run in this session."""
    return "cpu" if INTERPRET or not HAS_CUDA else "cuda"


def assert_compiles_for_gpu(program: str, *args: str, timeout: float = 600) -> None:
    """Run ``program`` (Python source that compiles kernels, typically with
    :func:`benchmarks.triton_compile.compile_for_gpu`, and prints "compiled") in a
    subprocess with the interpreter off, the checkout first on its path; skip when Triton or
    its ptxas is missing."""
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# Interpreter tests run fp32 and fp16 only (DESIGN.md "Numerics and tests"): bf16 on CUDA.
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            kernel_device() != "cuda", reason="bf16 kernels are checked on CUDA only"
        ),
    ),
]


def positional_signature(fn) -> list[tuple[str, object]]:
    """[(name, default)] of fn's positional parameters (self excluded): what code calling it
    positionally relies on. Keyword-only extensions are left out."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        (p.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in kinds and p.name != "self"
    ]


def signature_from_text(spec: str) -> list[tuple[str, object]]:
    """The positional signature written as source, "a, b=1" -> [("a", empty), ("b", 1)]."""
    return positional_signature(eval(f"lambda {spec}: None"))  # noqa: S307


def resolve(module: str, qualname: str):
    """The object at module + qualname ("pkg.mod", "Class.method")."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def official_signature_test(table: list[tuple[str, str, str]]):
    """A test over table's (module, qualname, official signature as source) rows: the same
    positional order, names and defaults (ours may add keyword-only arguments). Assign it to a
    ``test_...`` name in the test module."""

    @pytest.mark.parametrize(
        "module, qualname, spec", table, ids=[f"{module}.{name}" for module, name, _ in table]
    )
    def test(module: str, qualname: str, spec: str) -> None:
        assert positional_signature(resolve(module, qualname)) == signature_from_text(spec)

    return test
