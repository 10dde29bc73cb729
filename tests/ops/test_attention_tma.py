"""The forward's TMA path (tensor descriptors, Hopper): where the launcher takes it, that it
compiles to bulk tensor copies for sm_90, and that it computes what the pointer path does.

The CPU interpreter runs tensor descriptors as masked loads and stores of the same tiles, so
the interpreter tests force the path with ``attention_fwd(..., tma=True)``.
"""

from __future__ import annotations

import pytest
import torch

from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.reference import attention_ref
from flash_attn.ops.attention.triton.forward import attention_fwd, tma_allowed
from tests.ops.attention_testing import assert_within_criterion
from tests.testing import INTERPRET, assert_compiles_for_gpu, kernel_device

# ---------------------------------------------------------------------------------------------
# Selection


class FakeTensor:
    """What tma_allowed reads of a tensor: strides, element size, address, device."""

    def __init__(self, strides, itemsize=2, address=0, cuda=True):
        self._strides, self._itemsize, self._address = strides, itemsize, address
        self.is_cuda, self.device = cuda, "cuda:0" if cuda else "cpu"

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def element_size(self):
        return self._itemsize

    def data_ptr(self):
        return self._address


def contiguous(seqlen, heads, head_dim, **kw):
    """(batch, seqlen, heads, head_dim) contiguous."""
    return FakeTensor((seqlen * heads * head_dim, heads * head_dim, head_dim, 1), **kw)


@pytest.fixture
def hopper(monkeypatch):
    """Pretend every CUDA device has this compute capability major (default 9)."""

    def set_major(major=9):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))

    set_major()
    return set_major


def test_tma_taken_on_hopper_for_dense_aligned_tensors(hopper):
    t = contiguous(128, 8, 64)
    assert tma_allowed((t, t, t, t), dense=True)
    # 40 fp16 columns: 80-byte rows, still 16-byte aligned.
    t = contiguous(100, 8, 40)
    assert tma_allowed((t, t, t, t), dense=True)
    cpu = contiguous(100, 8, 40, cuda=False)
    assert not tma_allowed((cpu, cpu, cpu, cpu), dense=True)
    hopper(8)
    assert not tma_allowed((t, t, t, t), dense=True)


@pytest.mark.parametrize(
    "odd",
    [
        contiguous(128, 8, 36),  # 72-byte rows
        FakeTensor((128 * 8 * 64, 8 * 64, 64, 2)),  # strided head dim
        contiguous(128, 8, 64, address=8),  # misaligned base
    ],
    ids=["row-stride", "last-stride", "base"],
)
def test_pointer_path_for_other_layouts(hopper, odd):
    t = contiguous(128, 8, 64)
    assert not tma_allowed((t, odd, t, t), dense=True)


def test_tma_forced_or_refused(hopper):
    t = contiguous(128, 8, 64)
    assert not tma_allowed((t, t, t, t), dense=False)  # varlen or paged
    assert not tma_allowed((t, t, t, t), dense=True, tma=False)
    cpu = contiguous(128, 8, 64, cuda=False)
    assert tma_allowed((cpu, cpu, cpu, cpu), dense=True, tma=True)
    with pytest.raises(ValueError):
        tma_allowed((t, t, t, t), dense=False, tma=True)
    with pytest.raises(ValueError):
        tma_allowed((t, contiguous(128, 8, 36), t, t), dense=True, tma=True)


# ---------------------------------------------------------------------------------------------
# Compiled for sm_90

_COMPILE = """
from flash_attn.ops.attention.triton import forward as fwd
from flash_attn.utils.triton_compile import compile_for_gpu
from tests.ops.attention_testing import kernel_arg_types

types = kernel_arg_types(fwd._attn_fwd_kernel)
for on in (False, True):
    flags = dict(VARLEN=False, PAGED=False, HAS_SEQLENS_K=on, HAS_KV_BATCH_IDX=on, HAS_BIAS=on,
                 HAS_ALIBI=on, SOFTCAP=on, MASK_WINDOW=on, MASK_LEFT=on, DROPOUT=on,
                 STORE_PROBS=on, EVEN_M=not on, EVEN_N=not on, TMA=True, RERUN_STAGES=1,
                 HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, DOT_PRECISION="tf32")
    ptx = compile_for_gpu(fwd._attn_fwd_kernel, types, flags).asm["ptx"]
    # q, k, v loaded and the output stored by the bulk tensor copy engine.
    assert "cp.async.bulk.tensor.2d.shared::cta.global" in ptx, "no TMA load"
    assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx, "no TMA store"
    assert "tensormap.replace" in ptx, "descriptors not made in the kernel"
print("compiled")
"""


def test_tma_forward_compiles_to_bulk_tensor_copies_for_sm90():
    assert_compiles_for_gpu(_COMPILE)


# ---------------------------------------------------------------------------------------------
# Same results as the pointer path

needs_descriptors = pytest.mark.skipif(
    not INTERPRET and kernel_device() == "cuda"
    and torch.cuda.get_device_capability()[0] < 9,
    reason="tensor descriptors need a Hopper GPU or the interpreter",
)  # fmt: skip


def run_both(q, k, v, opts, **inputs):
    """(out, lse) of the TMA path and of the pointer path."""
    return attention_fwd(q, k, v, opts, tma=True, **inputs), attention_fwd(
        q, k, v, opts, tma=False, **inputs
    )


@needs_descriptors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [40, 96])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_matches_pointer_path(dtype, head_dim, causal):
    torch.manual_seed(0)
    device = kernel_device()
    # Lengths that are not multiples of any block; grouped-query heads.
    q = torch.randn(2, 77, 4, head_dim, dtype=dtype, device=device)
    k = torch.randn(2, 100, 2, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    opts = AttentionOptions.create(head_dim, causal=causal)
    (out, lse), (out_ptr, lse_ptr) = run_both(q, k, v, opts)
    torch.testing.assert_close(out, out_ptr, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ptr, rtol=0, atol=0)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=causal)[0]
    plain = attention_ref(q, k, v, causal=causal)[0]
    assert_within_criterion(out, ref, plain, dtype, "tma out")


@needs_descriptors
def test_tma_matches_pointer_path_on_a_kv_cache():
    """Cache rows chosen by k_batch_idx, keys [leftpad, seqlen) of each, a window, and keys
    split across programs: each program's descriptors cover exactly its keys. NaN in the
    slots past each sequence stays out of the output."""
    torch.manual_seed(0)
    device = kernel_device()
    q = torch.randn(2, 5, 4, 64, dtype=torch.float16, device=device)
    k = torch.randn(3, 160, 4, 64, dtype=torch.float16, device=device)
    v = torch.randn_like(k)
    seqlens_k = torch.tensor([150, 37], dtype=torch.int32, device=device)
    leftpad = torch.tensor([3, 0], dtype=torch.int32, device=device)
    k[0, 150:], v[0, 150:] = float("nan"), float("nan")
    opts = AttentionOptions.create(64, window_size=(48, 0))
    inputs = dict(seqlens_k=seqlens_k, cache_leftpad=leftpad, num_splits=2, max_seqlen_k=160,
                  k_batch_idx=torch.tensor([2, 0], dtype=torch.int32, device=device))  # fmt: skip
    (out, lse), (out_ptr, lse_ptr) = run_both(q, k, v, opts, **inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ptr, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ptr, rtol=0, atol=0)


@needs_descriptors
def test_tma_block_with_a_bad_masked_key_is_computed_again_on_pointers():
    """NaN in the v of a key that only the later queries see: the blocks that come out spoiled
    are computed again with the guard, on pointers, so both paths give the rows before the key
    exactly the clean result, and the rows that see it NaN."""
    torch.manual_seed(0)
    device = kernel_device()
    q, k, v = (torch.randn(1, 70, 2, 64, dtype=torch.float16, device=device) for _ in "qkv")
    opts = AttentionOptions.create(64, causal=True)
    clean, _ = attention_fwd(q, k, v, opts, tma=True)
    spoiled = v.clone()
    spoiled[:, 50, :, 7] = float("nan")
    (out, lse), (out_ptr, lse_ptr) = run_both(q, k, spoiled, opts)
    torch.testing.assert_close(out, out_ptr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, lse_ptr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out[:, :50], clean[:, :50], rtol=0, atol=0)
    assert out[:, 50:].isnan().any(-1).all()
