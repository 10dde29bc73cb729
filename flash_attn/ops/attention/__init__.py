"""Attention: the functional API, its checks and options, the PyTorch backend, the KV-cache
path, the naive and tiled references, and the Triton kernels (``triton/``).

    api.py            attention(): checks once per call signature, picks the backend, caches
                      a launch plan per signature (the Triton path), dispatches
    function.py       the autograd Function over the Triton launches, and the torch.library
                      ops (written-out schemas, fake implementations) that torch.compile traces
    checks.py         input checks: errors that name the argument
    options.py        AttentionOptions: the scalar options, named once
    torch_backend.py  plain PyTorch: SDPA where it covers the case, else the naive math
    kvcache.py        flash_attn_with_kvcache: decoding over a (paged) KV cache
    reference.py      the naive reference (materialises the scores): test oracle
    tiled.py          the paper's tiled forward and backward in PyTorch
    triton/           forward.py, backward.py (kernels and launchers), tuning.py (configs)
"""

from flash_attn.ops.attention.api import attention
from flash_attn.ops.attention.kvcache import flash_attn_with_kvcache
from flash_attn.ops.attention.options import AttentionOptions

__all__ = ["AttentionOptions", "attention", "flash_attn_with_kvcache"]
