"""Which tiles the attention kernels visit, and in which order: the kernels' own loop bounds
(``key_range``) and block order (``program_block``), run in a probe kernel."""

import pytest
import torch
import triton
import triton.language as tl

from flash_attn.ops.attention.reference import window_allowed
from flash_attn.ops.attention.triton.forward import heavy_last, key_range, program_block
from flash_attn.ops.attention.triton.tuning import SPACES


@triton.jit
def _probe_kernel(
    Start,
    Lo,
    Hi,
    seqlen_rows,
    seqlen_cols,
    before,
    after,
    OWNED: tl.constexpr,
    STEP: tl.constexpr,
):
    """For each program of a (1, blocks) grid: the first row of the block it owns and the
    [lo, hi) of the other side it loops over, as the kernels get them."""
    start, _, _, _ = program_block(OWNED, 1, heavy_last(before, after))
    lo, _, _, hi = key_range(start, seqlen_rows, seqlen_cols, before, after, OWNED, STEP)
    slot = tl.program_id(1)
    tl.store(Start + slot, start)
    tl.store(Lo + slot, lo)
    tl.store(Hi + slot, hi)


def visited_tiles(seqlen_q, seqlen_k, left, right, owned, step, transposed):
    """[(first row, lo, hi)] of each program in the order the GPU starts them (a (1, blocks)
    grid: block index order). transposed: the dK/dV kernel, which owns key blocks and steps
    through queries, the roles and the window's sides swapped."""
    unlimited = seqlen_q + seqlen_k
    before, after = (unlimited if w < 0 else w for w in (left, right))
    rows, cols = (seqlen_k, seqlen_q) if transposed else (seqlen_q, seqlen_k)
    if transposed:
        before, after = after, before
    blocks = triton.cdiv(rows, owned)
    start, lo, hi = (torch.zeros(blocks, dtype=torch.int32) for _ in range(3))
    _probe_kernel[(1, blocks)](start, lo, hi, rows, cols, before, after, owned, step)
    return list(zip(start.tolist(), lo.tolist(), hi.tolist()))


def tile_counts(seqlen, causal, window, owned, step, transposed):
    """(tile products, fully masked ones, work of each program in start order)."""
    left, right = window
    if causal:
        right = 0
    allowed = window_allowed(seqlen, seqlen, causal, window)
    if transposed:
        allowed = allowed.T
    products = masked = 0
    work = []
    for start, lo, hi in visited_tiles(seqlen, seqlen, left, right, owned, step, transposed):
        tiles = range(lo, hi, step)
        products += len(tiles)
        masked += sum(not allowed[start : start + owned, n : n + step].any() for n in tiles)
        work.append(len(tiles))
    return products, masked, work


def configs(kernel):
    block_ms, block_ns, _, _ = SPACES[kernel]
    return [(m, n) for m in block_ms for n in block_ns]


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (100, 0)), (True, (64, -1))])
def test_at_most_an_eighth_of_the_tiles_are_fully_masked(kernel, causal, window):
    transposed = kernel == "dkdv"
    for block_m, block_n in configs(kernel):
        owned, step = (block_n, block_m) if transposed else (block_m, block_n)
        products, masked, _ = tile_counts(512, causal, window, owned, step, transposed)
        assert masked * 8 <= products, f"{kernel} {block_m}x{block_n}: {masked}/{products}"


@pytest.mark.parametrize("kernel", ["fwd", "dkdv"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, 0)), (False, (0, -1))])
def test_causal_blocks_start_heaviest_first(kernel, causal, window):
    transposed = kernel == "dkdv"
    _, _, work = tile_counts(512, causal, window, 64, 32, transposed)
    assert work == sorted(work, reverse=True), work
    assert work[0] > work[-1]  # the case has light blocks to leave to the end


@pytest.mark.parametrize("kernel", ["fwd", "dkdv"])
@pytest.mark.parametrize("window", [(300, 20), (20, 300)])
def test_in_a_lopsided_window_the_light_end_runs_last(kernel, window):
    """The side of the window cut off the most makes its end of the sequence light; the other
    end loses at most the smaller side, under one step."""
    _, _, work = tile_counts(512, False, window, 64, 32, kernel == "dkdv")
    assert work[-1] == min(work) < max(work) and work[0] >= max(work) - 1, work


def test_without_a_window_blocks_run_in_sequence_order():
    starts = [start for start, _, _ in visited_tiles(300, 300, -1, -1, 64, 64, False)]
    assert starts == [0, 64, 128, 192, 256]
