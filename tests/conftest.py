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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
