"""The autotune spaces of the attention kernels and their pruning, fitted to what the compiler
emits (``scripts/kernel_report.py``): a kept config neither spills registers nor asks for more
shared memory than a block can get."""

from __future__ import annotations

import torch
import triton

from flash_attn.ops.backend import interpreter_enabled

MAX_BLOCK = 128  # the largest BLOCK_M or BLOCK_N of any config


def autotune_configs(block_ms, block_ns, stages, owned="BLOCK_M", warps=None):
    """Autotune candidates with ``warps`` warps, or one warpgroup (4 warps) per 64 rows of the
    block the program owns (``owned``), the rows a warpgroup MMA covers; a single config under
    the CPU interpreter."""
    if interpreter_enabled():
        # The interpreter runs programs one by one in NumPy: few, large blocks are fastest.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    configs = [{"BLOCK_M": bm, "BLOCK_N": bn} for bm in block_ms for bn in block_ns]
    return [triton.Config(c, num_warps=w, num_stages=s)
            for c in configs for w in warps or [c[owned] // 16] for s in stages
            if 16 * w >= c[owned]]  # fmt: skip


# What a config holds, fitted to the compiler's report (scripts/kernel_report.py) at head dims
# 64 to 256: 32-bit registers per program (fp32 accumulators and score tiles, more of the latter
# where tiles are masked by a window or causal mask, and, in the backward, a quarter of a
# register per element of each tile the loop loads, for its addresses), and elements in shared
# memory (tiles kept for the whole program, plus one buffer per pipeline stage for each tile
# the loop loads). Past its kernel's registers per thread, ptxas spills.
FOOTPRINTS = {
    "fwd": (160, lambda bm, bn, d, stages, masked: (
        bm * d + (1.5 + 2.5 * masked) * bm * bn, bm * d + stages * 2 * bn * d)),
    "dkdv": (92, lambda bm, bn, d, stages, masked: (
        2 * bn * d + (2 + masked) * bm * bn + 0.5 * bm * d, 2 * bn * d + stages * 2 * bm * d)),
    "dq": (128, lambda bm, bn, d, stages, masked: (
        bm * d + (2 + masked) * bm * bn + 0.5 * bn * d, 2 * bm * d + stages * 2 * bn * d)),
}  # fmt: skip


def shared_memory_limit() -> int:
    """Shared memory one block may use: the GPU's, or the smallest of the GPUs the kernels
    target (sm_80) where there is none (autotune spaces built without a device)."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return properties.shared_memory_per_block_optin
    return 163 * 1024


def prune_by(kernel):
    """``prune_configs_by`` of a kernel whose configs hold ``FOOTPRINTS[kernel]``."""
    registers_per_thread, footprint = FOOTPRINTS[kernel]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        itemsize = args["Q"].element_size()

        def fits(c):
            registers, elements = footprint(
                c.kwargs["BLOCK_M"],
                c.kwargs["BLOCK_N"],
                args["HEAD_DIM"],
                c.num_stages,
                args["MASK_WINDOW"],
            )
            return (registers <= registers_per_thread * 32 * c.num_warps
                    and elements * itemsize <= shared_memory_limit())  # fmt: skip

        return [c for c in configs if fits(c)] or configs[:1]

    return {"early_config_prune": prune}


# Retune when head dim, masking or the order of magnitude of the lengths change.
TUNE_KEY = ["HEAD_DIM", "MASK_WINDOW", "DROPOUT", "HAS_BIAS", "seqlen_q_bucket", "seqlen_k_bucket"]


FWD_CONFIGS = autotune_configs([64, 128], [16, 32, 64, 128], [2, 3])
# Two warpgroups share the key block: dK and dV accumulate in registers.
DKDV_CONFIGS = autotune_configs([16, 32, 64], [64, 128], [2], warps=[8])
DQ_CONFIGS = autotune_configs([64, 128], [32, 64], [2, 3], warps=[4, 8])
