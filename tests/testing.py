"""Helpers shared by the tests (import as ``from tests.testing import ...``).

``tests/conftest.py`` sets TRITON_INTERPRET before anything imports flash_attn.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "1") not in ("", "0")


def kernel_device() -> str:
    """Device on which the Triton kernels run in this session."""
    return "cpu" if INTERPRET or not HAS_CUDA else "cuda"


def assert_compiles_for_gpu(program: str, *args: str, timeout: float = 600) -> None:
    """Run ``program`` (Python source that compiles kernels, typically with
    :func:`flash_attn.utils.triton_compile.compile_for_gpu`, and prints "compiled") in a
    subprocess with the interpreter off; skip when Triton or its ptxas is missing."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", program, *args], capture_output=True,
                            text=True, env=env, timeout=timeout)  # fmt: skip
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
