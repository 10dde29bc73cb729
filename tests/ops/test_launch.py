"""What the Triton launchers share (flash_attn/ops/launch.py): host helpers."""

import torch
import triton

from flash_attn.ops.launch import cdiv, next_power_of_2
from flash_attn.ops.plans import contiguous_aligned


def test_host_helpers_agree_with_triton():
    for n in range(0, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(2**40 + 1) == 2**41


def test_contiguous_aligned():
    """A launch plan replays with the alignment of its first call: a tensor whose layout it
    does not key on comes back contiguous and 16-byte aligned, copied only where needed."""
    storage = torch.arange(40, dtype=torch.float32)
    aligned = storage[:32].view(4, 8)
    assert contiguous_aligned(aligned) is aligned
    misaligned = storage[1:33].view(4, 8)  # contiguous, 4 bytes past an aligned address
    assert misaligned.data_ptr() % 16 != 0
    fixed = contiguous_aligned(misaligned)
    assert fixed.data_ptr() % 16 == 0 and fixed.is_contiguous()
    torch.testing.assert_close(fixed, misaligned, rtol=0, atol=0)
    strided = storage[:32].view(8, 4).t()
    fixed = contiguous_aligned(strided)
    assert fixed.is_contiguous() and fixed.data_ptr() % 16 == 0
    torch.testing.assert_close(fixed, strided, rtol=0, atol=0)
