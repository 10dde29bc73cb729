"""What the compiler emits for every Triton kernel of the project, for a GPU that is not here.

Each kernel is launched by its own host launcher on ``meta`` tensors of representative shapes
(attention: batch 2 x seqlen 4096 x 32 heads, both backward schedules; the others: GPT shapes
of 8192 tokens, hidden 2048), compiled for ``sm_<arch>`` with Triton's bundled ptxas with the
config it runs with (an attention kernel's: its config table's, ``--tuned``: every config the
pruning keeps; an autotuned kernel's: every config its pruning keeps), and the cubin is
measured: registers, spills, shared memory, MMA instructions, and the main loop's instructions
in the SASS. A config fits when it does not spill and its shared memory fits in one block
(227 KB on sm_90, 163 KB on sm_80). With ``--unpruned`` every config of the autotune spaces is
compiled, kept or not: the evidence the footprints of
``flash_attn/ops/attention/triton/tuning.py`` are fitted to. ``--feature`` picks the attention
features compiled in (full, causal, window, dropout, softcap, bias, all): the config table is
checked against every one (``benchmarks/results/config_table_sm<arch>.md``).

    python scripts/kernel_report.py                    # everything, sm_90, bf16 and fp16
    python scripts/kernel_report.py --arch 80          # everything, sm_80 (A100)
    python scripts/kernel_report.py --quick            # bf16, head dim 128, 4 warps, 3 stages
    python scripts/kernel_report.py --kernel attn_fwd --head-dim 128 --config "128x64 w4"
    python scripts/kernel_report.py --kernel dkdv --head-dim 256 --unpruned --output -
    python scripts/kernel_report.py --kernel attn --dtype bf16 --dtype fp32 --feature full \
        --feature causal --feature window --feature dropout --feature softcap --feature bias \
        --feature all --output benchmarks/results/config_table_sm90.md

The report goes to stdout and to benchmarks/results/kernel_report_sm<arch>.md (``--output``).
"""

from __future__ import annotations

import os

# The kernels must be defined for the compiler, not the interpreter.
os.environ["TRITON_INTERPRET"] = "0"
# Triton 3.9's default (fused multiply-add on), stated so that it does not warn.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import checkout_path  # noqa: E402, F401 (the checkout's flash_attn and benchmarks/)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from benchmarks import kernel_report as kr  # noqa: E402
from flash_attn.ops.attention.triton import backward as attention_bwd  # noqa: E402
from flash_attn.ops.attention.triton import forward as attention  # noqa: E402
from flash_attn.ops.attention.triton import tuning as attention_tuning  # noqa: E402
from flash_attn.ops.cross_entropy.triton import kernels as cross_entropy  # noqa: E402
from flash_attn.ops.layer_norm.triton import kernels as layer_norm  # noqa: E402
from flash_attn.ops.mlp.triton import kernels as mlp  # noqa: E402
from flash_attn.ops.rotary.triton import kernels as rotary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BATCH, SEQLEN, HEADS = 2, 4096, 32
TOKENS, HIDDEN, VOCAB = BATCH * SEQLEN, 2048, 50304


def _t(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def call_by_name(launcher, values: dict):
    """Call ``launcher`` with the entries of ``values`` that its parameters name. A parameter
    annotated with a dataclass (an options object) is built from the values naming its fields;
    other values go to ``**kwargs`` if it has one. Launchers change their signatures more often
    than their meaning: an unused tensor, or an unused setting that is off (None, False, 0), is
    left out; an unused setting that is on is an error (that variant would not be measured)."""
    params = inspect.signature(launcher).parameters.values()
    kwargs, used = {}, set()
    for p in params:
        options = launcher.__globals__.get(p.annotation) if isinstance(p.annotation, str) else None
        if p.name in values:
            kwargs[p.name] = values[p.name]
            used.add(p.name)
        elif dataclasses.is_dataclass(options):
            fields = {f.name for f in dataclasses.fields(options)} & set(values)
            kwargs[p.name] = options(**{f: values[f] for f in fields})
            used |= fields
        elif p.default is p.empty and p.kind is not p.VAR_KEYWORD:
            raise TypeError(f"{launcher.__name__}: no value for its parameter {p.name}")
    rest = {k: v for k, v in values.items() if k not in used and not isinstance(v, torch.Tensor)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        if on := sorted(k for k, v in rest.items() if v is not None and v is not False and v != 0):
            raise TypeError(f"{launcher.__name__} takes none of {on}")
        rest = {}
    return launcher(**kwargs, **rest)


def attention_features(name: str, d: int, dt) -> dict:
    """The launchers' arguments that turn on feature set ``name`` (see :data:`FEATURES`)."""
    window = dict(window_left=256, window_right=0)
    bias = dict(bias=_t(BATCH, HEADS, SEQLEN, SEQLEN, dtype=dt))
    dropout = dict(dropout_p=0.1, seed=_t(1, dtype=torch.int64))
    alibi = dict(alibi_slopes=_t(HEADS, dtype=torch.float32))
    sets = {
        "full": {},
        "causal": dict(causal=True),
        "window": window,
        "dropout": dropout,
        "softcap": dict(softcap=30.0),
        "bias": bias,
        "all": dict(**window, **dropout, **bias, **alibi, softcap=30.0),
    }
    return sets[name]


FEATURES = ["full", "causal", "window", "dropout", "softcap", "bias", "all"]


def workloads(dtypes: list[str], head_dims: list[int], features: list[str]):
    """(variant label, launcher, its arguments by name) for every representative launch."""
    for name in dtypes:
        dt = DTYPES[name]
        for d in head_dims:
            q = _t(BATCH, SEQLEN, HEADS, d, dtype=dt)
            lse = _t(BATCH, HEADS, SEQLEN, dtype=torch.float32)
            for feature in features:
                label = f"{name} d{d} {feature}"
                args = dict(q=q, k=q, v=q, out=q, do=q, lse=lse, softmax_scale=d**-0.5)
                args.update(attention_features(feature, d, dt))
                yield label, attention.attention_fwd, args
                for deterministic in (False, True):
                    schedule = " deterministic" if deterministic else ""
                    bwd_args = dict(args, deterministic=deterministic)
                    yield label + schedule, attention_bwd.attention_bwd, bwd_args
        if name == "fp32":  # the fused ops take half precision
            continue
        x, w = _t(TOKENS, HIDDEN, dtype=dt), _t(HIDDEN, dtype=dt)
        stats = _t(TOKENS, dtype=torch.float32)
        for norm, rms in (("layernorm", False), ("rmsnorm", True)):
            label = f"{name} {norm} N={HIDDEN} +residual"
            off = dict(dropout_p=0.0, seed=None, is_rms_norm=rms)
            args = dict(x=x, weight=w, bias=None if rms else w, eps=1e-5, residual=x, **off)
            yield label, layer_norm.layer_norm_fwd, dict(args, store_residual_out=True)
            args = dict(dy=x, x=x, weight=w, mean=stats, rstd=stats, dresidual_out=x, **off)
            yield label, layer_norm.layer_norm_bwd, dict(args, residual_dtype=dt)
        cos = _t(SEQLEN, 64, dtype=torch.float32)
        args = dict(x=_t(BATCH, SEQLEN, HEADS, 128, dtype=dt), cos=cos, sin=cos)
        args.update(seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False)
        yield f"{name} rotary d128", rotary.rotary_fwd, dict(args, inplace=False, conjugate=False)
        args = dict(logits=_t(TOKENS, VOCAB, dtype=dt), labels=_t(TOKENS, dtype=torch.int64))
        args.update(dloss=stats, lse=stats, label_smoothing=0.0, lse_square_scale=0.0)
        args.update(ignore_index=-100)
        yield f"{name} vocab {VOCAB}", cross_entropy.cross_entropy_fwd, args
        yield f"{name} vocab {VOCAB}", cross_entropy.cross_entropy_bwd, args
        for act, gated, n in (("gelu_approx", False, 4 * HIDDEN), ("silu", True, 5632)):
            label = f"{name} {act}{' gated' if gated else ''} {HIDDEN}->{n}"
            fc1 = 2 * n if gated else n
            args = dict(x=x, weight=_t(fc1, HIDDEN, dtype=dt), bias=_t(fc1, dtype=dt))
            yield label, mlp.linear_act_fwd, dict(args, activation=act, gated=gated, store_pre=True)
            args = dict(dout=_t(TOKENS, n, dtype=dt), pre=_t(TOKENS, fc1, dtype=dt))
            yield label, mlp.linear_act_bwd, dict(args, activation=act, gated=gated)


def tasks(args) -> list[tuple[str, kr.Launch, object, bool]]:
    """(variants, launch, config, whether the pruning for sm_<arch> keeps it) to compile: the
    config each launch runs with (the attention kernels': their config table's; an autotuned
    kernel's: those its pruning keeps), the kept configs with --tuned or --config, or all with
    --unpruned, after the --kernel and --config filters. A launch
    that several variants make alike (the backward's delta kernel does not see causality) is
    compiled once, labelled with all of them. Call it under ``pruning_for(args.arch)``, so that
    the launchers and the pruning see that arch."""
    seen = {}
    for label, launcher, values in workloads(args.dtype, args.head_dim, args.features):
        for launch in kr.capture(launcher, lambda: call_by_name(launcher, values)):  # noqa: B023
            if args.kernel and not any(k in launch.name for k in args.kernel):
                continue
            kept = kr.kept_configs(launch)
            if args.unpruned:
                configs = kr.all_configs(launch)
            elif args.tuned or args.config or isinstance(launch.kernel, Autotuner):
                configs = kept
            else:  # what runs: the blocks the launcher passes (the config table's)
                configs = [None]
            for config in configs:
                name = kr.config_label(launch, config)
                if config is not None and args.config and not any(c in name for c in args.config):
                    continue
                key = (kr.launch_key(launch), name)
                in_kept = config is None or config in kept
                seen.setdefault(key, ([], launch, config, in_kept))[0].append(label)
    return [(", ".join(labels), *rest) for labels, *rest in seen.values()]


_TASKS: list = []  # what the worker processes compile, by index (inherited through fork)


def _measure(index: int, arch: int):
    """Compile and measure task ``index``: (Figures, or the compiler's error, and seconds)."""
    _, launch, config, _ = _TASKS[index]
    start = time.perf_counter()
    try:
        result = kr.analyse(kr.compile_launch(launch, config, arch))
    except Exception as e:  # a config the compiler rejects is a finding, not a crash
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        where = f"{lines[0]} " if len(lines) > 1 else ""  # a source position, then the error
        result = f"{type(e).__name__}: {where}{lines[-1]}"[:200].replace("|", "/")
    return result, time.perf_counter() - start


def measure_all(todo, arch: int, jobs: int) -> list:
    """Figures (or error messages) of every task, compiled ``jobs`` at a time."""
    global _TASKS
    _TASKS = todo
    indices = [(i, arch) for i in range(len(todo))]
    results = []
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    outcomes = pool.imap(_star_measure, indices) if pool else map(_star_measure, indices)
    for i, (result, seconds) in enumerate(outcomes):
        variant, launch, config, _ = todo[i]
        label = kr.config_label(launch, config)
        print(
            f"[{i + 1}/{len(todo)}] {launch.name} {variant} {label}: {seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    if pool:
        pool.close()
    return results


def _star_measure(index_arch):
    return _measure(*index_arch)


COLUMNS = [
    "variant",
    "config",
    "regs",
    "spill B st/ld",
    "smem KB",
    "MMA HGMMA/HMMA",
    "wgmma",
    "loop instr",
    "loop MMA",
    "loop groups",
    "loop int",
    "loop atomics",
    "loop spill",
    "instr/MMA",
    "instr/1k",
    "unmasked loop instr",
    "fits",
]


def row(variant: str, launch: kr.Launch, config, result, arch: int) -> list[str]:
    """One table row (the COLUMNS); a compiler error fills the figures' columns."""
    head = [variant, kr.config_label(launch, config)]
    if isinstance(result, str):
        return head + [f"error: {result}"] + [""] * (len(COLUMNS) - 3)
    f = result
    wgmma = "-" if not f.hgmma + f.hmma else "all" if not f.hmma else "part" if f.hgmma else "none"
    loop = ["-"] * 9
    if f.loop:
        blocks, warps, _ = kr.meta_parameters(launch, config)
        per_1k = f.loop.instructions * warps * 1024 / math.prod(blocks.values())
        per_mma = f"{f.loop.instructions / f.loop.mma:.1f}" if f.loop.mma else "-"
        loop = [f.loop.instructions, f.loop.mma, f.loop.groups, f.loop.integer, f.loop.atomics]
        loop += [f.loop.spill, per_mma, f"{per_1k:.0f}"]
        loop.append(f.unmasked.instructions if f.unmasked else "-")
    why = f.misfits(arch)
    fits = "no: " + "+".join(why) if why else "yes"
    spills = f"{f.spill_stores}/{f.spill_loads}"
    figures = [f.registers, spills, f"{f.shared / 1024:.1f}", f"{f.hgmma}/{f.hmma}", wgmma]
    figures += [*loop, fits]
    return head + [str(v) for v in figures]


def render(todo, results, arch: int, command: str, minutes: float, unpruned=False) -> str:
    """The markdown report: where and how it was made, then one table per kernel (with a
    "kept" column when ``unpruned``)."""
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or "?"
    limit = attention_tuning.shared_memory_of(arch) // 1024
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# Triton kernels compiled for sm_{arch}",
        "",
        f"- Machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, no GPU), "
        f"Triton {triton.__version__} and its bundled ptxas",
        f"- Date: {now:%Y-%m-%d %H:%M} UTC, {minutes:.0f} min; tree at commit {commit} "
        "(plus uncommitted changes, if any)",
        f"- Command: `{command}`",
        "",
        f"Shapes: attention batch {BATCH} x seqlen {SEQLEN} x {HEADS} heads; norms, MLP, "
        f"rotary and cross-entropy over {TOKENS} tokens, hidden {HIDDEN}, vocabulary {VOCAB}. "
        "Arguments are those the host launchers pass, specialised as a real launch "
        "specialises them (integers divisible by 16, aligned pointers, integers equal to 1). "
        "Every autotune config of the kernels' spaces is listed; kept: whether the pruning for "
        f"sm_{arch} keeps it."
        if unpruned
        else "Each launch is compiled with the config it runs with: an attention kernel's from "
        f"its config table for sm_{arch} (with --tuned or --config: every config its pruning "
        "keeps), an autotuned kernel's every config its pruning keeps.",
        "",
        "Columns: registers per thread; spill stores/loads in bytes; shared memory per block; "
        "MMA instructions in the SASS (HGMMA = wgmma, HMMA = mma.sync) and whether all of them "
        "are wgmma; the main loop (the innermost loop with the most MMA instructions, and of "
        "those the longest: with a mask, the copy for the blocks on its edge): static "
        "instruction count of one iteration (all paths), of which MMA, wgmma groups (one per "
        "matrix product on sm_90), vector integer ALU "
        f"({', '.join(sorted(kr.INTEGER))}), atomics ({', '.join(sorted(kr.ATOMIC))}) and "
        "spill (STL/LDL); instr/MMA: the loop's instructions per MMA instruction; instr/1k: "
        "loop instructions x warps per 1024 elements of the tile (product of the BLOCK sizes), "
        "comparable across configs; unmasked loop instr: the same loop's copy for the blocks "
        "every row sees whole (off the diagonal), where a mask makes two; fits: no spill and "
        f"shared memory <= {limit} KB.",
    ]
    tables, columns = {}, COLUMNS + ["kept"] * unpruned
    for (variant, launch, config, kept), result in zip(todo, results):
        cells = row(variant, launch, config, result, arch) + ["yes" if kept else "no"] * unpruned
        tables.setdefault(launch.name, []).append(cells)
    for name, rows in tables.items():
        fit = sum(r[len(COLUMNS) - 1] == "yes" for r in rows)
        lines += ["", f"## {name} ({fit} of {len(rows)} fit)", ""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--arch", type=int, default=90, help="compute capability: 90 (default), 80, ...")
    add("--kernel", action="append", default=[], help="kernels whose name contains this")
    add("--head-dim", type=int, action="append", help="attention head dims (64, 128, 256)")
    add("--dtype", action="append", choices=sorted(DTYPES), help="input dtypes (bf16, fp16)")
    add(
        "--config",
        action="append",
        default=[],
        help='autotune configs whose label contains this, e.g. "128x64 w4"; kernels '
        "launched with fixed blocks are always kept",
    )
    add("--quick", action="store_true", help="bf16, head dim 128, configs with 4 warps, 3 stages")
    add(
        "--feature",
        dest="features",
        action="append",
        choices=FEATURES,
        help="attention feature sets (default: full and causal)",
    )
    add(
        "--tuned",
        action="store_true",
        help="the configs the pruning keeps, instead of those the launchers pass",
    )
    add(
        "--unpruned",
        action="store_true",
        help="every autotune config, kept or not (a kept column says which)",
    )
    add("--jobs", type=int, default=1, help="compiles run in parallel")
    add("--output", help="markdown file, '-' for none (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtype, args.head_dim = args.dtype or ["bf16"], args.head_dim or [128]
        args.config = args.config or ["w4 s3"]
    args.dtype = args.dtype or ["bf16", "fp16"]
    args.features = args.features or ["full", "causal"]
    args.head_dim = args.head_dim or [64, 128, 256]
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(
        ["python scripts/kernel_report.py", *(f'"{w}"' if " " in w else w for w in words)]
    )

    start = time.perf_counter()
    with attention_tuning.pruning_for(args.arch):  # what launchers and pruning see
        todo = tasks(args)
    results = measure_all(todo, args.arch, args.jobs)
    minutes = (time.perf_counter() - start) / 60
    report = render(todo, results, args.arch, command, minutes, args.unpruned)
    print(report)
    output = args.output or ROOT / "benchmarks" / "results" / f"kernel_report_sm{args.arch}.md"
    if output != "-":
        Path(output).write_text(report)
        print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
