"""What the Triton launchers share (flash_attn/ops/launch.py): host integer helpers."""

import triton

from flash_attn.ops.launch import cdiv, next_power_of_2


def test_host_helpers_agree_with_triton():
    for n in range(0, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(2**40 + 1) == 2**41
