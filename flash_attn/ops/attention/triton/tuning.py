"""How the attention kernels get their configs (tile sizes, warps, pipeline stages): from a
committed table per GPU arch (``tables/sm<arch>.json``, see :func:`load_table`), one compile
per kernel and launch key; or, with ``FLASH_ATTN_AUTOTUNE=1``, by timing the configs of an
autotune space that a pruning keeps, fitted to what the compiler emits
(``scripts/kernel_report.py``) for the GPU the kernels run on, or for the one the report
compiles for (:func:`target_arch`). :func:`write_table` keeps what the autotuner chose.

A program owns a block of rows (the forward and dQ: BLOCK_M queries; dK/dV: BLOCK_N keys) and
loops over the other side in steps of the other block. A config is kept when its
:class:`Footprint` fits (it neither spills registers nor asks for more shared memory than a
block can get) and no config that fits takes longer steps with the same owned block and warps:
a longer step costs fewer loop instructions per element (the report's instr/1k column), so the
autotuner only weighs owned blocks, warps and pipeline stages, at most six configs per key.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
        return [parse_config(INTERPRETER_CONFIG)]
    block_ms, block_ns, warps, stages = SPACES[kernel]
    blocks = [{"BLOCK_M": bm, "BLOCK_N": bn} for bm in block_ms for bn in block_ns]
    owned = FOOTPRINTS[kernel].owned
    return [
        triton.Config(b, num_warps=w, num_stages=s)
        for b in blocks
        for w in warps
        for s in stages
        if 16 * w >= b[owned]
    ]


def autotuning() -> bool:
    """Whether ``FLASH_ATTN_AUTOTUNE=1``: each kernel then times the configs its pruning keeps
    for every new tune key (:data:`TUNE_KEY`), instead of taking the committed table's."""
    return os.environ.get("FLASH_ATTN_AUTOTUNE", "0") == "1"


def prune_by(kernel: str) -> dict:
    """``prune_configs_by`` of ``kernel``: the configs whose ``FOOTPRINTS[kernel]`` fits on
    :func:`target_arch` with the longest step for their owned block and warps (the first config
    when none fits)."""
    footprint = FOOTPRINTS[kernel]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        shape = (args["HEAD_DIM"], args["FEATURES"].MASK_WINDOW, args["Q"].element_size())
        where = (target_arch(), shared_memory_limit())
        kept = [c for c in configs if footprint.fits(c, *shape, *where)]
        group = lambda c: (c.kwargs[footprint.owned], c.num_warps)  # noqa: E731
        return largest(kept, group, footprint.step) or configs[:1]

    return {"early_config_prune": prune}


# Retune when the head dim, the features, the schedule of the backward or the order of
# magnitude of the lengths change (the names a kernel has).
TUNE_KEY = ["HEAD_DIM", "FEATURES", "ATOMIC_DQ", "seqlen_q_bucket", "seqlen_k_bucket"]
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# The JIT kernels that take their config from here, by name, and the space each draws from.
TUNED_KERNELS = {
    "_attn_fwd_kernel": "fwd",
    "_attn_decode_kernel": "fwd",
    "_attn_bwd_dkdv_kernel": "dkdv",
    "_attn_bwd_dq_kernel": "dq",
}
_autotuners: dict = {}  # kernel name -> the autotuned kernel, made on first use


def autotuned(kernel: str, fn):
    """``fn`` (the JIT function of ``kernel``: "fwd", "dkdv" or "dq") wrapped by
    ``triton.autotune`` with its space, its pruning and the :data:`TUNE_KEY` names it has. The
    dQ accumulator is zeroed before each timed run (the dK/dV kernel adds to it)."""
    tuner = _autotuners.get((kernel, fn))
    if tuner is None:
        names = fn.arg_names
        tuner = triton.autotune(
            configs=autotune_configs(kernel),
            key=[name for name in TUNE_KEY if name in names],
            prune_configs_by=prune_by(kernel),
            reset_to_zero=["DQAccum"] if "DQAccum" in names else None,
        )(fn)
        _autotuners[(kernel, fn)] = tuner
    return tuner


def kernel_config(kernel: str, fn, constants: dict, dtype: torch.dtype) -> tuple:
    """(what to launch, the config's arguments) for ``fn``, the JIT function of ``kernel``, at
    one launch key: with ``FLASH_ATTN_AUTOTUNE=1`` the autotuned kernel, which picks its own;
    otherwise ``fn`` and the config of :func:`table_config`, BLOCK_M, BLOCK_N, num_warps and
    num_stages, one compile per kernel and key."""
    if autotuning():
        return autotuned(kernel, fn), {}
    config = table_config(kernel, {**flat(constants), "dtype": DTYPE_NAMES[dtype]})
    return fn, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# ---------------------------------------------------------------------------------------------
# The config tables

TABLES = Path(__file__).with_name("tables")  # sm<arch>.json, committed
INTERPRETER_CONFIG = "64x64 w4 s1"  # the interpreter runs programs one by one: large blocks


def parse_config(label: str) -> triton.Config:
    """The config of a label such as "128x64 w4 s2" (BLOCK_M x BLOCK_N, warps, stages)."""
    blocks, warps, stages = label.split()
    block_m, block_n = (int(b) for b in blocks.split("x"))
    if not 16 <= min(block_m, block_n) <= max(block_m, block_n) <= MAX_BLOCK:
        # The launchers drop bounds checks on lengths that are multiples of MAX_BLOCK.
        raise ValueError(f"config {label!r}: BLOCK_M and BLOCK_N must be in [16, {MAX_BLOCK}]")
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n},
        num_warps=int(warps.removeprefix("w")),
        num_stages=int(stages.removeprefix("s")),
    )


def config_label(config: triton.Config) -> str:
    """The label of a config, as :func:`parse_config` reads it."""
    blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


@functools.cache
def _read_table(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_table(arch: int) -> dict:
    """The config table for ``sm_<arch>``: the file ``FLASH_ATTN_CONFIG_TABLE`` names (one that
    :func:`write_table` wrote) when it is for that arch, else the committed one (sm_80's for an
    arch without its own).

    A table: {"arch": 90, "about": text, "kernels": {"fwd": rules, "dkdv": rules, "dq": rules}},
    each rule {"when": {name: value or [values], "any": [flags]}, "config": label}. A rule
    applies when each named argument of the launch (a kernel constant such as HEAD_DIM,
    MASK_WINDOW, DROPOUT, seqlen_k_bucket, or "dtype": "bf16", "fp16", "fp32") equals its value
    or is in its list, and one of the flags under "any" is on (:func:`rule_applies`); the first
    rule that applies gives the config, and each kernel's last rule applies always.
    """
    user = os.environ.get("FLASH_ATTN_CONFIG_TABLE")
    if user:
        try:
            table = _read_table(user)
        except (OSError, ValueError) as e:
            raise ValueError(f"FLASH_ATTN_CONFIG_TABLE={user}: not a config table ({e})") from e
        if table.get("arch") == arch:
            return table
    path = TABLES / f"sm{arch}.json"
    return _read_table(str(path if path.exists() else TABLES / "sm80.json"))


def flat(args: dict) -> dict:
    """``args`` with the fields of its ``FEATURES`` (a ``Features``) in its place, by name: what
    the rules of a config table name."""
    features = args.get("FEATURES")
    if features is None:
        return args
    return {**{k: v for k, v in args.items() if k != "FEATURES"}, **features._asdict()}


def rule_applies(when: dict, args: dict) -> bool:
    """Whether every condition of a rule holds for the launch arguments ``args``: each named
    argument equals its value or is in its list, and of the flags listed under "any" (e.g.
    ["DROPOUT", "HAS_BIAS"]), one at least is on."""
    for name, wanted in when.items():
        if name == "any":
            if not any(args[flag] for flag in wanted):
                return False
            continue
        value = args[name]
        if value not in wanted if isinstance(wanted, list) else value != wanted:
            return False
    return True


def table_config(kernel: str, args: dict) -> triton.Config:
    """The config of ``kernel`` for the launch arguments ``args`` (its constants by name and
    "dtype"): the first rule of :func:`load_table`'s table for :func:`target_arch` that applies,
    or, under the CPU interpreter, :data:`INTERPRETER_CONFIG`."""
    if interpreter_enabled():
        return parse_config(INTERPRETER_CONFIG)
    for rule in load_table(target_arch())["kernels"][kernel]:
        if rule_applies(rule["when"], args):
            return parse_config(rule["config"])
    raise LookupError(f"the config table of sm_{target_arch()} has no rule for {kernel} {args}")


def tuned_rules() -> dict:
    """{kernel: rules} of what the autotuned kernels of this process chose, one rule per tune
    key (its names and the dtype of q), most recent last."""
    rules = {}
    for (kernel, _), tuner in _autotuners.items():
        for key, config in tuner.cache.items():
            when = flat(dict(zip(tuner.keys, key)))
            when["dtype"] = DTYPE_NAMES[getattr(torch, key[len(tuner.keys)].split(".")[-1])]
            rules.setdefault(kernel, []).append({"when": when, "config": config_label(config)})
    return rules


def write_table(path) -> dict:
    """Write to ``path`` (JSON) the configs the autotuner chose in this process
    (``FLASH_ATTN_AUTOTUNE=1``), ahead of the rules of the table in use for this GPU, and
    return the table. Keep it with ``FLASH_ATTN_CONFIG_TABLE=path``."""
    arch = target_arch()
    base = load_table(arch)
    tuned = tuned_rules()
    kernels = {name: tuned.get(name, []) + rules for name, rules in base["kernels"].items()}
    about = f"autotuned on sm_{arch} ({len(sum(tuned.values(), []))} rules), then: "
    table = {"arch": arch, "about": about + base.get("about", ""), "kernels": kernels}
    Path(path).write_text(table_text(table))
    return table


def table_text(table: dict) -> str:
    """A config table as JSON with one rule per line (how the committed tables are written)."""
    kernels = ",\n".join(
        f'  "{name}": [\n' + ",\n".join(f"   {json.dumps(rule)}" for rule in rules) + "\n  ]"
        for name, rules in table["kernels"].items()
    )
    head = f'{{\n "arch": {table["arch"]},\n "about": {json.dumps(table["about"])},\n'
    return head + f' "kernels": {{\n{kernels}\n }}\n}}\n'
