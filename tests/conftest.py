"""Test-wide setup.

TRITON_INTERPRET must be set before flash_attn (and its kernels) are imported, so Triton
kernels run on CPU tensors here. On a machine with a GPU, set TRITON_INTERPRET=0 to test the
compiled kernels on CUDA instead.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FLASH_ATTN_BACKEND", None)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")


def kernel_device() -> str:
    """Device on which the Triton kernels run in this session."""
    return "cpu" if INTERPRET or not HAS_CUDA else "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
