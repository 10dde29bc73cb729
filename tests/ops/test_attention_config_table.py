"""The attention kernels' config tables (attention/triton/tables/sm<arch>.json): how a launch
finds its config, the opt-in autotuner and the table it writes, and every config of the
committed tables computing the right thing (in the interpreter, whose block shapes are those
of the compiled kernels)."""

import json

import pytest
import torch
import triton

from flash_attn.ops.attention.options import AttentionOptions
from flash_attn.ops.attention.reference import attention_ref
from flash_attn.ops.attention.triton import backward, forward
from flash_attn.ops.attention.triton import tuning as at
from tests.ops.attention_testing import assert_within_criterion

KERNELS = ["fwd", "dkdv", "dq"]
ARCHS = [80, 90]
NO_FEATURES = forward.Features(**{name: False for name in forward.Features._fields})
# A launch's arguments as table rules see them (kernel_constants' names with the features by
# name, and the dtype).
PLAIN = dict(
    HEAD_DIM=128,
    **NO_FEATURES._asdict(),
    ATOMIC_DQ=True,
    seqlen_q_bucket=4096,
    seqlen_k_bucket=4096,
    dtype="bf16",
)


@pytest.fixture
def compiled_kernels(monkeypatch):
    """Look configs up as for compiled kernels (not the interpreter's one config)."""
    monkeypatch.setattr(at, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("FLASH_ATTN_CONFIG_TABLE", raising=False)
    monkeypatch.delenv("FLASH_ATTN_AUTOTUNE", raising=False)


def table_configs(arch):
    return {rule["config"] for kernel in KERNELS for rule in at.load_table(arch)["kernels"][kernel]}


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_tables_end_in_a_rule_for_every_launch(arch):
    table = at.load_table(arch)
    assert table["arch"] == arch and table["about"]
    for kernel in KERNELS:
        rules = table["kernels"][kernel]
        assert rules[-1]["when"] == {}, f"sm_{arch} {kernel}: no catch-all last rule"
        for rule in rules:
            assert set(rule["when"]) <= set(PLAIN) | {"any"}, rule  # names a launch has
            assert set(rule["when"].get("any", [])) <= set(PLAIN), rule
            config = at.parse_config(rule["config"])
            assert at.config_label(config) == rule["config"]


def test_the_first_rule_that_applies_gives_the_config(compiled_kernels):
    with at.pruning_for(90):
        assert at.config_label(at.table_config("fwd", PLAIN)) == "64x64 w4 s3"
        wide = dict(PLAIN, HEAD_DIM=256)
        assert at.config_label(at.table_config("fwd", wide)) == "64x64 w8 s2"
        assert (
            at.config_label(at.table_config("fwd", dict(wide, MASK_WINDOW=True))) == "64x32 w8 s2"
        )
        # fp32's rule comes first, whatever the head dim; combined features take smaller tiles.
        assert at.config_label(at.table_config("fwd", dict(wide, dtype="fp32"))) == "16x16 w8 s1"
        dropout_and_bias = dict(PLAIN, DROPOUT=True, HAS_BIAS=True)
        assert at.config_label(at.table_config("fwd", dropout_and_bias)) == "64x32 w4 s2"
        assert at.config_label(at.table_config("fwd", dict(PLAIN, DROPOUT=True))) == "64x64 w4 s3"
    with at.pruning_for(86):  # no table of its own: sm_80's
        assert at.table_config("dq", PLAIN) == at.parse_config("64x32 w8 s2")


@pytest.mark.parametrize("label", ["256x64 w8 s2", "64x8 w4 s2"])
def test_a_config_outside_the_blocks_the_launchers_assume_is_refused(label):
    with pytest.raises(ValueError, match="BLOCK_M and BLOCK_N must be in"):
        at.parse_config(label)


def test_rules_match_values_and_lists():
    assert at.rule_applies({}, PLAIN)
    assert at.rule_applies({"HEAD_DIM": [64, 128], "dtype": "bf16"}, PLAIN)
    assert not at.rule_applies({"HEAD_DIM": [32, 64]}, PLAIN)
    assert not at.rule_applies({"MASK_WINDOW": True}, PLAIN)
    assert at.rule_applies({"any": ["DROPOUT", "ATOMIC_DQ"], "dtype": "bf16"}, PLAIN)
    assert not at.rule_applies({"any": ["DROPOUT", "HAS_BIAS"]}, PLAIN)


def test_without_autotuning_a_launch_compiles_the_tables_config_only(compiled_kernels):
    q = torch.empty(2, 512, 4, 128, dtype=torch.bfloat16, device="meta")
    constants = forward.kernel_constants(q, q, AttentionOptions(0.1))
    with at.pruning_for(90):
        kernel, config = at.kernel_config("fwd", forward._attn_fwd_kernel, constants, q.dtype)
    assert kernel is forward._attn_fwd_kernel
    assert config == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def test_autotuning_is_opt_in_and_zeroes_the_dq_accumulator(compiled_kernels, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_AUTOTUNE", "1")
    kernel, config = at.kernel_config("dkdv", backward._attn_bwd_dkdv_kernel, {}, torch.float16)
    assert isinstance(kernel, triton.runtime.Autotuner) and config == {}
    assert kernel.reset_to_zero == ["DQAccum"]
    assert "ATOMIC_DQ" in kernel.keys and "FEATURES" in kernel.keys
    assert at.kernel_config("dkdv", backward._attn_bwd_dkdv_kernel, {}, torch.float16)[0] is kernel


def test_a_written_table_keeps_the_tuned_configs_first(compiled_kernels, monkeypatch, tmp_path):
    """write_table turns the autotuner's choices into rules ahead of the table in use, and
    FLASH_ATTN_CONFIG_TABLE makes launches read it."""
    monkeypatch.setenv("FLASH_ATTN_AUTOTUNE", "1")
    tuner = at.kernel_config("fwd", forward._attn_fwd_kernel, {}, torch.float16)[0]
    launch = dict(PLAIN, HEAD_DIM=64, FEATURES=NO_FEATURES)  # as the autotuner sees a launch
    key = tuple(launch[name] for name in tuner.keys)
    chosen = at.parse_config("128x32 w8 s3")
    monkeypatch.setattr(tuner, "cache", {(*key, "torch.float16", "torch.float16"): chosen})
    path = tmp_path / "table.json"
    with at.pruning_for(90):
        written = at.write_table(path)
    assert json.loads(path.read_text()) == written
    rules = written["kernels"]["fwd"]
    assert rules[0] == {
        "when": {**at.flat(dict(zip(tuner.keys, key))), "dtype": "fp16"},
        "config": "128x32 w8 s3",
    }
    assert rules[1:] == at.load_table(90)["kernels"]["fwd"]
    monkeypatch.setenv("FLASH_ATTN_CONFIG_TABLE", str(path))
    with at.pruning_for(90):
        tuned = dict(PLAIN, HEAD_DIM=64, dtype="fp16")
        assert at.table_config("fwd", tuned) == chosen
        assert at.config_label(at.table_config("fwd", PLAIN)) == "64x64 w4 s3"  # not tuned
    with at.pruning_for(80):  # a table for another arch is not read
        assert at.table_config("fwd", dict(PLAIN, HEAD_DIM=64)) == at.parse_config("64x32 w8 s2")


@pytest.mark.parametrize("label", sorted(table_configs(80) | table_configs(90)))
def test_every_table_config_computes_attention_and_its_gradients(label, monkeypatch):
    """Each config of the tables, forced on every kernel, on a case with a window, softcap,
    dropout off and lengths that are no multiple of a block, in both backward schedules."""
    config = at.parse_config(label)
    monkeypatch.setattr(at, "table_config", lambda kernel, args: config)
    monkeypatch.setattr(at, "interpreter_enabled", lambda: False)
    torch.manual_seed(0)
    q = torch.randn(1, 45, 2, 32, dtype=torch.float16)
    k, v = (torch.randn(1, 70, 1, 32, dtype=torch.float16) for _ in range(2))
    do = torch.randn_like(q)
    options = dict(causal=True, window_size=(30, -1), softcap=5.0)

    def reference(precision):
        leaves = [t.to(precision).requires_grad_() for t in (q, k, v)]
        out = attention_ref(*leaves, **options)[0]
        return (out, *torch.autograd.grad(out, leaves, do.to(precision)))

    exact, plain = reference(torch.float64), reference(torch.float16)
    for deterministic in (False, True):
        opts = AttentionOptions(32**-0.5, True, 30, -1, 5.0, 0.0, deterministic)
        out, lse = forward.attention_fwd(q, k, v, opts)
        grads = backward.attention_bwd(do, q, k, v, out, lse, opts)[:3]
        for name, ours, e, p in zip(["out", "dq", "dk", "dv"], (out, *grads), exact, plain):
            where = f"{label} deterministic={deterministic} {name}"
            assert_within_criterion(ours, e, p, torch.float16, where)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_a_bad_config_table_file_is_named(compiled_kernels, monkeypatch, tmp_path, content):
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("FLASH_ATTN_CONFIG_TABLE", str(path))
    with pytest.raises(ValueError, match="FLASH_ATTN_CONFIG_TABLE=.*table.json"):
        at.load_table(90)
