"""Backend selection shared by every op.

- ``triton``: the Triton kernels. CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was
  set before ``flash_attn`` was imported (the interpreter reads it when a kernel is defined).
- ``torch``: plain PyTorch, any device.
- ``auto`` (default): ``triton`` for CUDA tensors when Triton imports, else ``torch``.

``FLASH_ATTN_BACKEND`` overrides ``auto``. Asking for a backend that cannot serve the input
is an error, never a silent fallback.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


try:
    import triton  # noqa: F401

    _TRITON_IMPORTS = True
except ImportError:
    _TRITON_IMPORTS = False


def triton_available() -> bool:
    """True when ``import triton`` works (it is optional: CPU-only installs may lack it)."""
    return _TRITON_IMPORTS


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_serves(device: torch.device) -> bool:
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def resolve_backend(
    backend: str | None, device: torch.device, dtype: torch.dtype | None = None
) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Args:
        backend: ``None``/``"auto"``, ``"triton"`` or ``"torch"``. ``None`` reads
            ``FLASH_ATTN_BACKEND`` (default ``"auto"``).
        device: the device of the op's inputs.
        dtype: the dtype of the op's main input; every op passes it, so that the Triton
            interpreter is never given bfloat16 (see :func:`_check_interpreter_dtype`).
    Raises:
        ValueError: unknown backend name, ``"triton"`` for a device it cannot serve, or for
            bfloat16 CPU tensors.
    """
    if backend is None:
        backend = os.environ.get("FLASH_ATTN_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not _triton_serves(device):
        if not triton_available():
            why = "Triton is not installed"
        else:
            why = (
                f"tensors are on {device.type}; Triton runs CUDA tensors, or CPU tensors when "
                "TRITON_INTERPRET=1 is set before flash_attn is imported"
            )
        raise ValueError(f"backend='triton' cannot serve this input: {why}")
    if backend == "triton" and device.type == "cpu":
        _check_interpreter_dtype(dtype)
    return backend


def _check_interpreter_dtype(dtype: torch.dtype | None) -> None:
    # The interpreter computes tl.dot on bf16 wrongly (a fused MLP gave 3e21 for 0.46 with
    # triton 3.x); one rule for every op keeps interpreter results trustworthy.
    if dtype == torch.bfloat16:
        raise ValueError(
            "backend='triton' cannot run bfloat16 CPU tensors: the Triton interpreter "
            "(TRITON_INTERPRET=1) computes bfloat16 products wrongly; use float16 or float32 "
            "tensors, or backend='torch'"
        )


def reads_values(t: torch.Tensor) -> bool:
    """Whether checks may read the values of ``t``'s device tensors: always on the CPU; on a GPU,
    where each read synchronises the host with the device (and a CUDA graph cannot be
    captured), only with ``FLASH_ATTN_CHECK_VALUES=1``; never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type in READ_FREELY or os.environ.get("FLASH_ATTN_CHECK_VALUES", "0") == "1"


READ_FREELY = {"cpu"}  # devices whose tensors the host reads without a synchronisation
