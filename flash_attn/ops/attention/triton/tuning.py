"""The autotune spaces of the attention kernels and their pruning, fitted to what the compiler
emits (``scripts/kernel_report.py``) for the GPU the kernels run on, or for the one the report
compiles for (:func:`target_arch`).

A program owns a block of rows (the forward and dQ: BLOCK_M queries; dK/dV: BLOCK_N keys) and
loops over the other side in steps of the other block. A config is kept when its
:class:`Footprint` fits (it neither spills registers nor asks for more shared memory than a
block can get) and no config that fits takes longer steps with the same owned block and warps:
a longer step costs fewer loop instructions per element (the report's instr/1k column), so the
autotuner only weighs owned blocks, warps and pipeline stages, at most six configs per key.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.launch import largest

MAX_BLOCK = 128  # the largest BLOCK_M or BLOCK_N of any config
# Shared memory one block may use (the opt-in maximum), bytes, by compute capability.
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_arch: int | None = None  # set by pruning_for


def target_arch() -> int:
    """Compute capability (10 * major + minor, e.g. 90) the configs are pruned for: the one
    :func:`pruning_for` sets, else the current GPU's, else 90."""
    if _arch is not None:
        return _arch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


@contextlib.contextmanager
def pruning_for(arch: int):
    """Prune for ``sm_<arch>`` inside the ``with`` block (the kernel report compiles for a GPU
    that is not here)."""
    global _arch
    previous, _arch = _arch, arch
    try:
        yield
    finally:
        _arch = previous


def shared_memory_limit() -> int:
    """Shared memory one block may use, bytes: the GPU's own, or :data:`SHARED_MEMORY`'s for
    the arch :func:`pruning_for` names (sm_80's for an arch it lacks)."""
    if _arch is None and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return properties.shared_memory_per_block_optin
    return shared_memory_of(target_arch())


def shared_memory_of(arch: int) -> int:
    """Shared memory one block may use on ``sm_<arch>``, bytes (sm_80's for an arch that
    :data:`SHARED_MEMORY` lacks)."""
    return SHARED_MEMORY.get(arch, SHARED_MEMORY[80])


@dataclass(frozen=True)
class Footprint:
    """What a config of one kernel holds, fitted to the compiler's report at head dims 64 to 256.

    Registers per thread, (accumulators x owned x HEAD_DIM + (scores + masked) x BLOCK_M x
    BLOCK_N + loaded x step x HEAD_DIM) / threads + guard x HEAD_DIM / 16, with ``masked`` and
    ``guard`` counted where a window or causal mask is compiled in, must stay within a budget.
    Its terms (fp32 accumulators, score tiles, the tiles a step loads, and what the NaN guard
    for masked keys holds per 16 head-dim columns: the forward's rerun of a block that comes
    out non-finite, dQ's zeroing of non-finite keys) weigh differently on sm_90, whose wgmma
    reads operands from shared memory, and on the other archs, whose mma.sync reads them from
    registers: ``registers`` holds (budget, scores, masked, loaded, guard) for 90 and for 80
    (every other arch).
    Shared memory holds (kept x owned + stages x 2 x step) x HEAD_DIM elements: the tiles kept
    for the whole program, and one buffer per pipeline stage for each of the two tiles a step
    loads.
    """

    owned: str  # the block a program owns, "BLOCK_M" or "BLOCK_N"; it steps through the other
    accumulators: int
    kept: int
    registers: dict[int, tuple[float, float, float, float, float]]

    def step(self, config) -> int:
        """The block the loop steps through."""
        return config.kwargs["BLOCK_N" if self.owned == "BLOCK_M" else "BLOCK_M"]

    def registers_per_thread(self, config, head_dim: int, masked: bool, arch: int):
        """(estimated registers per thread, budget) of ``config`` on ``sm_<arch>``."""
        budget, scores, mask, loaded, guard = self.registers[90 if arch // 10 == 9 else 80]
        tile = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
        accumulators = self.accumulators * config.kwargs[self.owned] * head_dim
        loads = loaded * self.step(config) * head_dim
        elements = accumulators + (scores + mask * masked) * tile + loads
        return elements / (32 * config.num_warps) + guard * masked * head_dim / 16, budget

    def shared_bytes(self, config, head_dim: int, itemsize: int) -> int:
        """Shared memory of one block, bytes."""
        rows = self.kept * config.kwargs[self.owned] + config.num_stages * 2 * self.step(config)
        return rows * head_dim * itemsize

    def fits(self, config, head_dim: int, masked: bool, itemsize: int, arch: int, shared: int):
        """Whether ``config`` stays within the register budget of ``sm_<arch>`` and within
        ``shared`` bytes of shared memory."""
        registers, budget = self.registers_per_thread(config, head_dim, masked, arch)
        return registers <= budget and self.shared_bytes(config, head_dim, itemsize) <= shared


# Refit when the kernels change: ``scripts/kernel_report.py --unpruned --arch <80|90>`` compiles
# every config, and ``scripts/fit_footprints.py`` finds, per arch, terms under which no kept
# config spills and the longest kept step of every owned block and warps is the longest that
# compiles cleanly, at head dims 64, 128 and 256, causal or not (budgets inside the range that
# allows; terms that score alike are equally good).
FOOTPRINTS = {
    # q and the output accumulator stay; each step loads k and v.
    "fwd": Footprint("BLOCK_M", 1, 1, {90: (176, 0.5, 0.25, 0.25, 6), 80: (106, 1, 4, 0, 0)}),
    # k and v stay, with the dK and dV accumulators; each step loads q and dO.
    "dkdv": Footprint("BLOCK_N", 2, 2, {90: (100, 0.5, 0, 1, 0), 80: (180, 10, 3, 0.5, 0)}),
    # q and dO stay, with the dQ accumulator; each step loads k and v.
    "dq": Footprint("BLOCK_M", 1, 2, {90: (229, 0.5, 0, 2, 2), 80: (135, 8, 2, 0, 0)}),
}

# (BLOCK_M values, BLOCK_N values, warps, pipeline stages) of each kernel's autotune space.
SPACES = {
    # One warpgroup per 64 query rows, or two on 64 rows (they split the head dim).
    "fwd": ([64, 128], [32, 64, 128], [4, 8], [2, 3]),
    # Two warpgroups share the key block: dK and dV accumulate in registers.
    "dkdv": ([16, 32, 64], [32, 64, 128], [8], [2]),
    "dq": ([64, 128], [16, 32, 64], [4, 8], [2]),
}


def autotune_configs(kernel: str) -> list:
    """The autotune candidates of ``kernel`` (:data:`SPACES`, with at least 16 rows of the
    owned block per warp), or a single config under the CPU interpreter."""
    if interpreter_enabled():
        # The interpreter runs programs one by one in NumPy: few, large blocks are fastest.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    block_ms, block_ns, warps, stages = SPACES[kernel]
    blocks = [{"BLOCK_M": bm, "BLOCK_N": bn} for bm in block_ms for bn in block_ns]
    owned = FOOTPRINTS[kernel].owned
    return [triton.Config(b, num_warps=w, num_stages=s)
            for b in blocks for w in warps for s in stages if 16 * w >= b[owned]]  # fmt: skip


def autotuning() -> bool:
    """False when ``FLASH_ATTN_AUTOTUNE=0``: each kernel then compiles and runs the first kept
    config of each tune key, without timing the others (tests, quick runs)."""
    return os.environ.get("FLASH_ATTN_AUTOTUNE", "1") != "0"


def prune_by(kernel: str) -> dict:
    """``prune_configs_by`` of ``kernel``: the configs whose ``FOOTPRINTS[kernel]`` fits on
    :func:`target_arch` with the longest step for their owned block and warps (the first config
    when none fits)."""
    footprint = FOOTPRINTS[kernel]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        shape = (args["HEAD_DIM"], args["MASK_WINDOW"], args["Q"].element_size())
        where = (target_arch(), shared_memory_limit())
        kept = [c for c in configs if footprint.fits(c, *shape, *where)]
        group = lambda c: (c.kwargs[footprint.owned], c.num_warps)  # noqa: E731
        kept = largest(kept, group, footprint.step) or configs[:1]
        return kept if autotuning() else kept[:1]

    return {"early_config_prune": prune}


# Retune when head dim, masking or the order of magnitude of the lengths change.
TUNE_KEY = ["HEAD_DIM", "MASK_WINDOW", "DROPOUT", "HAS_BIAS", "seqlen_q_bucket", "seqlen_k_bucket"]


def autotune(kernel: str):
    """The ``triton.autotune`` decorator of ``kernel`` ("fwd", "dkdv" or "dq"): its space, its
    pruning, and :data:`TUNE_KEY`."""
    return triton.autotune(configs=autotune_configs(kernel), key=TUNE_KEY,
                           prune_configs_by=prune_by(kernel))  # fmt: skip
