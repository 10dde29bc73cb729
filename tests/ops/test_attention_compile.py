"""The attention kernels compile for a real GPU (sm_90), no GPU needed.

The interpreter accepts code that the compiler rejects (types, block shapes, constexpr use),
so every kernel is also compiled, with its features off and all on, by Triton's bundled ptxas.
"""

import os
import subprocess
import sys

import pytest

_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flash_attn.ops.triton import attention as fwd, attention_bwd as bwd

POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "DBias": "*fp32", "Slopes": "*fp32",
            "Seed": "*i64", "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32", "SeqlensK": "*i32",
            "KBatchIdx": "*i32", "BlockTable": "*i32"}
FLOATS = {"softmax_scale", "softcap", "dropout_p"}


def build(kernel, **consts):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap the autotuner
        fn = fn.fn
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS or name[0].isupper():
            sig[name] = POINTERS.get(name, "*fp16")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    consts = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))


blocks = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32")
for on in (False, True):
    flags = dict(VARLEN=on, HAS_SEQLENS_K=False, HAS_KV_BATCH_IDX=False, HAS_BIAS=on,
                 HAS_ALIBI=on, SOFTCAP=on, MASK_WINDOW=on, DROPOUT=on, **blocks)
    build(fwd._attn_fwd_kernel, **dict(flags, HAS_SEQLENS_K=not on, HAS_KV_BATCH_IDX=not on,
                                       PAGED=not on))
    build(fwd._attn_probs_kernel, **flags)
    build(bwd._attn_bwd_dkdv_kernel, **flags)
    build(bwd._attn_bwd_dq_kernel, DBIAS=on, **flags)
build(bwd._attn_bwd_delta_kernel, HEAD_DIM=128, VARLEN=True, BLOCK_M=64)
print("compiled")
"""


def test_attention_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    if "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
