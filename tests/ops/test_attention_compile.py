"""The attention kernels compile for a real GPU (sm_90), no GPU needed.

The interpreter accepts code that the compiler rejects (types, block shapes, constexpr use),
so every kernel is also compiled, with its features off and all on, by Triton's bundled ptxas.
"""

from tests.testing import assert_compiles_for_gpu

_COMPILE = """
from flash_attn.ops.attention.triton import backward as bwd, cache, forward as fwd
from benchmarks.triton_compile import compile_for_gpu
from tests.ops.attention_testing import kernel_arg_types


def build(kernel, **constexprs):
    compile_for_gpu(kernel, kernel_arg_types(kernel), constexprs)


blocks = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION="tf32")
for on in (False, True):
    features = fwd.Features(SCORE_MODS=on, SOFTCAP=on, HAS_BIAS=on, HAS_ALIBI=on, MASK_WINDOW=on,
                            MASK_LEFT=on, DROPOUT=on, EVEN_M=not on, EVEN_N=not on)
    flags = dict(VARLEN=on, HAS_SEQLENS_K=False, FEATURES=features, **blocks)
    forward = {k: v for k, v in flags.items() if k != "HAS_SEQLENS_K"}
    build(fwd._attn_fwd_kernel, **forward, STORE_PROBS=on, RERUN_STAGES=1 + on)
    build(fwd._attn_decode_kernel, **forward, HAS_KV_BATCH_IDX=not on, PAGED=on, SPLIT_KV=not on,
          STORE_PROBS=not on, RERUN_STAGES=2 - on)
    build(bwd._attn_bwd_dkdv_kernel, ATOMIC_DQ=on, DBIAS=on, **flags)
    build(bwd._attn_bwd_dkdv_kernel, ATOMIC_DQ=not on, DBIAS=not on, **flags)
    build(bwd._attn_bwd_dq_kernel, DBIAS=on, **flags)
rows = dict(HEAD_DIM=128, VARLEN=True, BLOCK_M=64)
build(bwd._attn_bwd_preprocess_kernel, ZERO_DQ=True, **rows)
build(bwd._attn_bwd_dq_finish_kernel, **rows)
for paged in (False, True):  # the KV cache's update: rows or pages, with or without left padding
    build(cache._append_kernel, S_NEW=1, H=8, D=128, HAS_ROWS=not paged, PAGED=paged,
          HAS_LEFTPAD=not paged, BLOCK_H=8, BLOCK_D=128)
print("compiled")
"""


def test_attention_kernels_compile_for_sm90():
    assert_compiles_for_gpu(_COMPILE)
