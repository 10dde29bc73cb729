"""What the compiler emits for a Triton kernel launch, measured without a GPU.

A host launcher is run on ``meta`` tensors with its module's kernels replaced by recorders, so
the kernels see exactly the arguments a real launch passes (names, dtypes, strides, flags).
Each launch is then compiled for ``sm_<arch>`` the way ``JITFunction.run`` compiles it: integer
arguments divisible by 16 and 16-byte aligned pointers get ``tt.divisibility = 16``, integers
equal to 1 become constants. The cubin gives registers, shared memory, spills and the SASS.

Needs ``TRITON_INTERPRET=0`` set before the kernels are defined (a script or a subprocess).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature

from flash_attn.ops.attention.triton.tuning import (
    TUNED_KERNELS,
    autotune_configs,
    prune_by,
    shared_memory_of,
)
from flash_attn.ops.launch import unwrap_jit

MMA = {"HGMMA", "HMMA"}
SPILL = {"STL", "LDL"}
# Copies from global to shared memory that do not wait (cp.async and TMA): a pipelined loop.
ASYNC_COPY = {"LDGSTS", "UTMALDG"}
# Vector integer ALU work: address arithmetic, index masks, compares, Hopper's vector integer
# adds (VIADD) and sign extensions (SGXT); uniform-datapath U* ops run once per warp and are
# left out.
INTEGER = {
    "VIADD",
    "SGXT",
    "IMAD",
    "IADD3",
    "IADD",
    "IMUL",
    "LEA",
    "SHF",
    "SHL",
    "SHR",
    "LOP3",
    "LOP",
    "ISETP",
    "IMNMX",
    "VIMNMX",
    "IABS",
    "SEL",
    "ISCADD",
    "BMSK",
    "FLO",
    "POPC",
    "PRMT",
}
# Atomic read-modify-writes to global or shared memory (the backward's dQ accumulation).
ATOMIC = {"RED", "REDG", "REDS", "ATOM", "ATOMG", "ATOMS"}
# What opens each group of wgmma instructions: one group per matrix product on sm_90.
WGMMA_GROUP = "WARPGROUP.ARRIVE"


@dataclass
class Launch:
    """One kernel launch made by a host launcher: the kernel object (autotuner or plain JIT
    function) and its arguments, before any autotune config is applied."""

    name: str
    kernel: KernelInterface
    args: tuple
    kwargs: dict


@dataclass
class Loop:
    """Static instruction counts of one loop body in the SASS (every path of the body)."""

    instructions: int
    mma: int
    integer: int
    spill: int
    groups: int = 0  # wgmma groups (sm_90: one per matrix product)
    atomics: int = 0


@dataclass
class Figures:
    """What one compiled kernel uses: registers per thread, spill bytes, shared memory bytes,
    MMA instructions in the whole kernel, and its main loop (None without a loop)."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    hgmma: int
    hmma: int
    loop: Loop | None
    # The same loop's other copy, with as many MMAs and the fewest instructions: the blocks seen
    # whole beside those on a mask's edge (the diagonal); None when there is one copy.
    unmasked: Loop | None = None

    def misfits(self, arch: int) -> list[str]:
        """Why it does not fit one block on ``sm_<arch>``: "spill", "smem", or nothing."""
        too_much_shared = self.shared > shared_memory_of(arch)
        spilled = self.spill_stores + self.spill_loads > 0
        return [why for why, bad in (("spill", spilled), ("smem", too_much_shared)) if bad]


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch instead of running."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel, args, kwargs))

        return record


def kernels(module) -> dict:
    """The Triton functions (kernels, autotuned or not, and JIT helpers) of ``module``'s
    namespace, by name."""
    return {n: k for n, k in vars(module).items() if isinstance(k, KernelInterface)}


def capture(launcher, run) -> list[Launch]:
    """The kernel launches that ``run()`` makes by calling ``launcher``: meanwhile every kernel
    of the launcher's module is replaced by a recorder. Pass ``meta`` tensors: nothing runs."""
    module = sys.modules[launcher.__module__]
    launches = []
    with contextlib.ExitStack() as stack:
        for name, kernel in kernels(module).items():
            recorder = _Recorder(unwrap_jit(kernel).__name__, kernel, launches)
            stack.enter_context(mock.patch.object(module, name, recorder))
        run()
    return launches


def launch_key(launch: Launch) -> tuple:
    """What makes two launches compile alike: kernel, argument values, tensors' layouts."""

    def describe(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
        if isinstance(v, tuple):  # arguments grouped in tuples (strides, score modifiers)
            return tuple(describe(x) for x in v)
        return v

    args = tuple(describe(v) for v in launch.args)
    return (launch.name, args, tuple((k, describe(v)) for k, v in launch.kwargs.items()))


def all_configs(launch: Launch) -> list:
    """The kernel's autotune configs (an attention kernel's: its space in ``tuning``), or
    ``[None]`` for a kernel launched with fixed meta-parameters only."""
    if isinstance(launch.kernel, Autotuner):
        return list(launch.kernel.configs)
    space = TUNED_KERNELS.get(launch.name)
    return autotune_configs(space) if space else [None]


def kept_configs(launch: Launch) -> list:
    """The autotune configs that survive the kernel's own pruning for these arguments (for the
    GPU here, or the arch that ``tuning.pruning_for`` names), or ``[None]`` for a
    kernel launched with fixed meta-parameters only."""
    tuner = launch.kernel
    space = TUNED_KERNELS.get(launch.name)
    if space is not None:
        args = dict(zip(unwrap_jit(tuner).arg_names, launch.args)) | launch.kwargs
        return prune_by(space)["early_config_prune"](autotune_configs(space), args)
    if not isinstance(tuner, Autotuner):
        return [None]
    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
    try:
        return list(tuner.prune_configs(launch.kwargs))
    finally:
        tuner.nargs = None


def meta_parameters(launch: Launch, config) -> tuple[dict, int, int]:
    """(BLOCK_* sizes, num_warps, num_stages) of ``launch`` with ``config`` applied."""
    kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {})}
    blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    return blocks, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)


def config_label(launch: Launch, config) -> str:
    """``<BLOCK_* sizes joined by x> w<num_warps> s<num_stages>``, e.g. ``128x64 w4 s3``."""
    blocks, warps, stages = meta_parameters(launch, config)
    return f"{'x'.join(map(str, blocks.values()))} w{warps} s{stages}".strip()


def compile_launch(launch: Launch, config, arch: int = 90):
    """Compile ``launch`` (with ``config`` applied) for ``sm_<arch>``, specialised as
    ``JITFunction.run`` specialises a real launch; returns Triton's compiled kernel."""
    fn: JITFunction = unwrap_jit(launch.kernel)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    kwargs.setdefault("debug", fn.debug or knobs.runtime.debug)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The two steps of JITFunction.run that turn arguments into a signature and attributes.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _tool(name: str, *args: str, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = getattr(knobs.nvidia, name).path
        return subprocess.run(
            [tool, *args, str(path)], check=True, capture_output=True, text=True
        ).stdout


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?\w+\s+)?([A-Z][\w.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction of ``nvdisasm -c``
    output; a branch's operands are replaced by its target's address, as a string."""
    labels, instructions, pending = {}, [], []
    for line in text.splitlines():
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTRUCTION.match(line):
            address = int(m.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            instructions.append((address, m.group(2), m.group(3).strip()))
    resolved = []
    for address, opcode, operands in instructions:
        if (m := _TARGET.search(operands)) and m.group(1) in labels:
            operands = str(labels[m.group(1)])
        resolved.append((address, opcode, operands))
    return resolved


def _spill_bytes(opcode: str) -> int:
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in opcode:
            return size
    return 4


def innermost_loops(instructions: list[tuple[int, str, str]]) -> list[tuple[bool, Loop]]:
    """(pipelined, loop) of every innermost loop (a backward branch to an earlier address, no
    other loop inside); pipelined: it has MMAs and copies to shared memory asynchronously."""
    spans = [
        (int(operands), address)
        for address, opcode, operands in instructions
        if opcode.split(".")[0] == "BRA" and operands.isdigit() and int(operands) < address
    ]
    innermost = [
        (lo, hi)
        for lo, hi in spans
        if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans)
    ]
    loops = []
    for lo, hi in innermost:
        ops = [op for address, op, _ in instructions if lo <= address <= hi]
        body = [op.split(".")[0] for op in ops]
        loop = Loop(
            instructions=len(body),
            mma=sum(op in MMA for op in body),
            integer=sum(op in INTEGER for op in body),
            spill=sum(op in SPILL for op in body),
            groups=sum(op.startswith(WGMMA_GROUP) for op in ops),
            atomics=sum(op in ATOMIC for op in body),
        )
        loops.append((loop.mma > 0 and any(op in ASYNC_COPY for op in body), loop))
    return loops


def main_loop(instructions: list[tuple[int, str, str]]) -> Loop | None:
    """The main loop: among innermost loops, the one with the most MMA instructions, then the
    most instructions (with a mask, the copy for the blocks on its edge). Pipelined loops count
    first: a kernel's loop without asynchronous copies, beside pipelined ones, is a rarely run
    path (the attention kernels' guarded rerun)."""
    loops = innermost_loops(instructions)
    best = max(loops, key=lambda pair: (pair[0], pair[1].mma, pair[1].instructions), default=None)
    return best and best[1]


def unmasked_loop(instructions: list[tuple[int, str, str]]) -> Loop | None:
    """The copy of the main loop with as many MMAs and the fewest instructions (the kernels
    compile one loop for blocks seen whole and one for blocks on a mask's edge), or None when
    the main loop has no such other copy."""
    main = main_loop(instructions)
    loops = innermost_loops(instructions)
    pipelined = any(p and loop == main for p, loop in loops)
    copies = [loop for p, loop in loops if p == pipelined and main and loop.mma == main.mma]
    lightest = min(copies, key=lambda loop: loop.instructions, default=None)
    return lightest if lightest is not None and lightest.instructions < main.instructions else None


def analyse(compiled) -> Figures:
    """Registers (cuobjdump), spills and MMA counts (nvdisasm SASS), shared memory (Triton's
    launch metadata) of a compiled kernel."""
    cubin = compiled.asm["cubin"]
    registers = int(re.search(r"REG:(\d+)", _tool("cuobjdump", "-res-usage", cubin=cubin))[1])
    instructions = parse_sass(_tool("nvdisasm", "-c", cubin=cubin))
    ops = [op for _, op, _ in instructions]
    return Figures(
        registers=registers,
        spill_stores=sum(_spill_bytes(op) for op in ops if op.startswith("STL")),
        spill_loads=sum(_spill_bytes(op) for op in ops if op.startswith("LDL")),
        shared=compiled.metadata.shared,
        hgmma=sum(op.startswith("HGMMA") for op in ops),
        hmma=sum(op.startswith("HMMA") for op in ops),
        loop=main_loop(instructions),
        unmasked=unmasked_loop(instructions),
    )
