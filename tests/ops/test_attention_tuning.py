"""Autotune spaces and their pruning (attention/triton/tuning.py, and the fused MLP's), for sm_80
and sm_90 without a GPU: the configs a compiled kernel would weigh, pruned on ``meta`` tensors."""

import pytest
import torch

pytest.importorskip("triton")

from flash_attn.ops.attention.triton import tuning as at  # noqa: E402
from flash_attn.ops.attention.triton.forward import Features  # noqa: E402
from flash_attn.ops.mlp.triton import kernels as mlp  # noqa: E402

ATTENTION = ["fwd", "dkdv", "dq"]
KEYS = [(arch, d, masked) for arch in (80, 90) for d in (64, 128, 256) for masked in (False, True)]


@pytest.fixture
def spaces(monkeypatch):
    """Each attention kernel's candidates for the compiler (not the interpreter's one config)."""
    monkeypatch.setattr(at, "interpreter_enabled", lambda: False)
    return {kernel: at.autotune_configs(kernel) for kernel in ATTENTION}


def kept(kernel, configs, arch, head_dim, masked, dtype=torch.bfloat16):
    """The configs the kernel's pruning keeps for one tune key on ``sm_<arch>``."""
    q = torch.empty(0, dtype=dtype, device="meta")
    with at.pruning_for(arch):
        prune = at.prune_by(kernel)["early_config_prune"]
        features = Features(**{name: False for name in Features._fields} | {"MASK_WINDOW": masked})
        return prune(configs, {"Q": q}, HEAD_DIM=head_dim, FEATURES=features)


def label(c):
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def test_the_128x128_eight_warp_forward_is_kept_at_head_dim_128_on_sm90(spaces):
    assert "128x128 w8 s2" in {label(c) for c in kept("fwd", spaces["fwd"], 90, 128, False)}


@pytest.mark.parametrize("kernel", ATTENTION)
@pytest.mark.parametrize(("arch", "head_dim", "masked"), KEYS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kept_configs_fit_and_are_few(spaces, kernel, arch, head_dim, masked, dtype):
    footprint, configs = at.FOOTPRINTS[kernel], spaces[kernel]
    result = kept(kernel, configs, arch, head_dim, masked, dtype)
    assert 1 <= len(result) <= 6
    where = (2, arch, at.SHARED_MEMORY[arch])
    fitting = [c for c in configs if footprint.fits(c, head_dim, masked, *where)]
    assert all(c in fitting for c in result)
    # Of the fitting configs with the same owned block and warps, only the longest steps.
    for c in fitting:
        same = [
            k
            for k in result
            if (k.kwargs[footprint.owned], k.num_warps) == (c.kwargs[footprint.owned], c.num_warps)
        ]
        assert same and all(footprint.step(k) >= footprint.step(c) for k in same)


def test_pruning_drops_configs_over_the_budget(spaces):
    footprint, configs = at.FOOTPRINTS["fwd"], spaces["fwd"]
    big = next(c for c in configs if label(c) == "128x128 w8 s2")
    registers, budget = footprint.registers_per_thread(big, 256, True, 90)
    assert registers > budget and big not in kept("fwd", configs, 90, 256, True)
    # Three stages of 64x128 at head dim 256 exceed shared memory on either arch.
    deep = next(c for c in configs if label(c) == "64x128 w4 s3")
    assert footprint.shared_bytes(deep, 256, 2) > at.SHARED_MEMORY[90]
    # The budgets differ by arch: mma.sync on sm_80 holds more in registers than wgmma.
    assert kept("fwd", configs, 80, 128, True) != kept("fwd", configs, 90, 128, True)


def test_the_target_arch_is_the_one_pruned_for():
    if not torch.cuda.is_available():
        assert at.target_arch() == 90  # the report's default
    with at.pruning_for(80):
        assert at.target_arch() == 80 and at.shared_memory_limit() == 163 * 1024
        with at.pruning_for(90):
            assert at.shared_memory_limit() == 227 * 1024
        assert at.target_arch() == 80


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_keeps_few_tiles_within_the_accumulator_budget(monkeypatch, gated):
    monkeypatch.setattr(mlp, "interpreter_enabled", lambda: False)
    configs = mlp._configs()
    result = mlp._prune(configs, {}, GATED=gated)
    assert 1 <= len(result) <= 6
    for c in result:
        accumulators = (1 + gated) * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        assert accumulators <= mlp.ACCUMULATORS_PER_THREAD * 32 * c.num_warps
    assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in result) == 128 * (128 >> gated)
