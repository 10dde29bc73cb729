"""Host time of every op: the Python and PyTorch work before and around each kernel launch,
measured on any machine, GPU or not.

    python scripts/bench_host.py                 # writes benchmarks/results/host_<machine>.md
    python scripts/bench_host.py --rows flash_attn_func,trivial --calls 50 --out -

Triton's driver is replaced by a stand-in (:class:`StandInDriver`) that compiles every kernel
for sm_90 with the bundled ptxas and runs everything a real launch runs (argument binding,
launch plans, Triton's launcher class) except the driver call itself and the C code that packs
the arguments for it; the tensors live
on the CPU and the kernels compute nothing. Shapes are tiny, so that what PyTorch computes on
the CPU (a matmul of the fused MLP, the model's linear layers) costs little beside the host work;
host work does not grow with them. Each row is the median CPU thread time of one call
in µs, and in units of a trivial launch (a 4-argument ``@triton.jit`` kernel called the usual
way, ``kernel[grid](...)``), timed in turn with each row, so that figures compare across
machines and a slow spell of a shared machine cancels out. ``launches`` counts the kernel
launches of one call, ``host reads`` the reads of tensor values on the host (``.item()``,
``.tolist()``, ``bool(t)``, ...), each of which is a host-device synchronisation on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, read when they are defined
os.environ["FLASH_ATTN_AUTOTUNE"] = "0"  # nothing to time on a stand-in
os.environ["FLASH_ATTN_BACKEND"] = "triton"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import checkout_path  # noqa: E402, F401 (the checkout's flash_attn and benchmarks/)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import driver as nvidia_driver  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver, CudaLauncher  # noqa: E402

from benchmarks.common import machine_name  # noqa: E402

LAUNCHES = [0]


class _StandInUtils:
    """The driver utilities a launch calls, without a GPU: binaries load as dummy handles, and
    a launch reads each tensor's pointer (as the real launcher does) and counts itself."""

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass

    def build_signature_metadata(self, kernel_signature):
        return tuple(kernel_signature)

    def get_device_properties(self, device):
        return {
            "max_shared_mem": 232448,
            "multiprocessor_count": 132,
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 1980000,
            "mem_clock_rate": 2619000,
            "mem_bus_width": 5120,
        }

    def launch(self, *launch_args):
        LAUNCHES[0] += 1
        for arg in launch_args[-1]:  # the kernel's arguments: read each tensor's pointer
            if type(arg) is torch.Tensor:
                arg.data_ptr()


class StandInDriver(CudaDriver):
    """Triton's CUDA driver for an sm_90 GPU that is not there (see the module docstring)."""

    def __init__(self):
        self.utils = _StandInUtils()
        self.launcher_cls = CudaLauncher
        self.get_current_device = lambda: 0
        self.set_current_device = lambda device: None
        self.get_current_stream = lambda device=None: 0
        self.get_device_capability = lambda device=None: (9, 0)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        """An autotuner's timing: every config runs once and takes the same time."""

        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench


def install_stand_in() -> None:
    """Make the stand-in Triton's active driver, and let the ``triton`` backend serve the CPU
    tensors it launches on (``FLASH_ATTN_BACKEND=triton`` is set above) as it serves a GPU's."""
    import flash_attn.ops.backend as backend

    nvidia_driver.PyKernelArg = lambda nested_tuple, type: type
    nvidia_driver.ARG_TUPLE, nvidia_driver.ARG_KERNEL, nvidia_driver.ARG_CONSTEXPR = range(3)
    triton.runtime.driver.set_active(StandInDriver())
    backend._triton_serves = lambda device: True
    backend.READ_FREELY = set()  # the checks treat the CPU tensors as a GPU's


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
    }

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@triton.jit
def _trivial_kernel(X, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offsets, tl.load(X + offsets, mask=offsets < n), mask=offsets < n)


# -- the rows: each builder returns a callable that runs one call ------------------------------


def _trivial():
    x, y = torch.zeros(64), torch.zeros(64)
    return lambda: _trivial_kernel[(1,)](x, y, 64, BLOCK=64)


def _qkv(requires_grad=False, batch=2, seqlen=16, heads=2, dim=32):
    shape = (batch, seqlen, heads, dim)
    return [torch.randn(shape, dtype=torch.float16, requires_grad=requires_grad) for _ in "qkv"]


def _flash_attn_func():
    from flash_attn import flash_attn_func

    q, k, v = _qkv()
    return lambda: flash_attn_func(q, k, v, causal=True)


def _flash_attn_func_grad():
    from flash_attn import flash_attn_func

    q, k, v = _qkv(requires_grad=True)
    return lambda: flash_attn_func(q, k, v, causal=True)


def _flash_attn_func_fwd_bwd():
    from flash_attn import flash_attn_func

    q, k, v = _qkv(requires_grad=True)
    dout = torch.randn_like(q)
    return lambda: flash_attn_func(q, k, v, causal=True).backward(dout)


def _varlen_fwd_bwd():
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t.reshape(-1, *t.shape[2:]).detach().requires_grad_() for t in _qkv())
    cu_seqlens = torch.tensor([0, 11, 32], dtype=torch.int32)
    dout = torch.randn_like(q)

    def call():
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 21, 21, causal=True)
        out.backward(dout)

    return call


def _kvcache_decode():
    from flash_attn import flash_attn_with_kvcache

    q = torch.randn(2, 1, 2, 32, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 64, 2, 32, dtype=torch.float16) for _ in "kv")
    k, v = (torch.randn(2, 1, 2, 32, dtype=torch.float16) for _ in "kv")
    cache_seqlens = torch.tensor([40, 17], dtype=torch.int32)
    return lambda: flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True
    )


def _norm(rms: bool):
    def build():
        from flash_attn.ops.layer_norm import layer_norm_fn, rms_norm_fn

        x = torch.randn(16, 32, dtype=torch.float16, requires_grad=True)
        residual = torch.randn_like(x, requires_grad=True)
        weight = torch.ones(32, dtype=torch.float16, requires_grad=True)
        bias = None if rms else torch.zeros(32, dtype=torch.float16, requires_grad=True)
        dy = torch.randn_like(x)
        fn = rms_norm_fn if rms else layer_norm_fn

        def call():
            out = fn(x, weight, bias, residual=residual, prenorm=True)[0]
            out.backward(dy)

        return call

    return build


def _rotary():
    from flash_attn.ops.rotary import apply_rotary

    x = torch.randn(2, 16, 2, 32, dtype=torch.float16, requires_grad=True)
    cos, sin = (torch.randn(16, 16, dtype=torch.float16) for _ in "cs")
    dy = torch.randn_like(x)
    return lambda: apply_rotary(x, cos, sin).backward(dy)


def _cross_entropy():
    from flash_attn.ops.cross_entropy import cross_entropy_loss

    logits = torch.randn(16, 64, dtype=torch.float16, requires_grad=True)
    labels = torch.randint(0, 64, (16,))
    return lambda: cross_entropy_loss(logits, labels).backward()


def _linear_cross_entropy():
    from flash_attn.ops.linear_cross_entropy import linear_cross_entropy

    # fp32 here and in the fused MLP: the products PyTorch computes beside the kernels would
    # cost a CPU 40+ µs each in fp16, which is compute, not host work.
    hidden = torch.randn(16, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 64, (16,))
    return lambda: linear_cross_entropy(hidden, weight, labels).backward()


def _fused_mlp():
    from flash_attn.ops.mlp import fused_mlp

    x = torch.randn(16, 32, requires_grad=True)
    w1 = torch.randn(128, 32, requires_grad=True)
    w2 = torch.randn(32, 128, requires_grad=True)
    return lambda: fused_mlp(x, w1, None, w2, None).sum().backward()


def _gpt2_step():
    from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel

    config = GPTConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=12, n_head=2)
    model = GPTLMHeadModel(config)
    input_ids = torch.randint(0, 64, (1, 16))

    def call():  # fp32: a CPU's bf16 matmul costs 100+ µs of compute, which is not host work
        model(input_ids, labels=input_ids).loss.backward()

    return call


def _autograd_floor():
    x = torch.randn(2, 16, 2, 32, dtype=torch.float16, requires_grad=True)
    dy = torch.randn_like(x)
    return lambda: (x * 2).backward(dy)


class _PlainBlock(torch.nn.Module):
    """A pre-norm GPT-2 block in plain PyTorch modules and SDPA, as minimal GPT codebases
    write it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc, self.fc_out = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):  # (B, S, E) -> (B, S, E)
        q, k, v = self.qkv(self.ln_1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        gelu = torch.nn.functional.gelu(self.fc(self.ln_2(x)), approximate="tanh")
        return x + self.fc_out(gelu)


def _gpt2_step_plain():
    """The model of :func:`_gpt2_step` in plain PyTorch: what host time PyTorch itself costs."""
    width, vocab = 32, 64
    embed, positions = torch.nn.Embedding(vocab, width), torch.nn.Embedding(64, width)
    blocks = torch.nn.ModuleList(_PlainBlock(width, heads=2) for _ in range(12))
    ln_f = torch.nn.LayerNorm(width)
    input_ids = torch.randint(0, vocab, (1, 16))

    def call():
        x = embed(input_ids) + positions(torch.arange(16))
        for block in blocks:
            x = block(x)
        logits = torch.nn.functional.linear(ln_f(x), embed.weight)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten()).backward()

    return call


ROWS = {
    "trivial": ("a trivial 4-argument launch (the unit)", _trivial),
    "flash_attn_func": ("`flash_attn_func` forward, no grad", _flash_attn_func),
    "flash_attn_func_grad": ("`flash_attn_func` forward, requires_grad", _flash_attn_func_grad),
    "flash_attn_func_fwd_bwd": ("`flash_attn_func` forward + backward", _flash_attn_func_fwd_bwd),
    "varlen_fwd_bwd": ("`flash_attn_varlen_func` forward + backward", _varlen_fwd_bwd),
    "kvcache_decode": ("`flash_attn_with_kvcache` decode step", _kvcache_decode),
    "layer_norm": ("`layer_norm_fn` with residual, forward + backward", _norm(rms=False)),
    "rms_norm": ("`rms_norm_fn` with residual, forward + backward", _norm(rms=True)),
    "rotary": ("rotary, forward + backward", _rotary),
    "cross_entropy": ("cross-entropy, forward + backward", _cross_entropy),
    "linear_cross_entropy": (
        "linear cross-entropy, forward + backward (fp32)",
        _linear_cross_entropy,
    ),
    "fused_mlp": ("fused MLP, forward + backward (fp32)", _fused_mlp),
    "gpt2_step": ("12-layer GPT-2-shaped model, forward + backward (fp32)", _gpt2_step),
    # References: what PyTorch alone costs on the host.
    "autograd_floor": ("reference: PyTorch `x * 2`, forward + backward", _autograd_floor),
    "gpt2_step_plain": (
        "reference: the same model in plain PyTorch modules and SDPA, forward + backward",
        _gpt2_step_plain,
    ),
}


def _median_time(call, calls: int) -> float:
    """Median CPU thread time of ``calls`` calls, in µs."""
    times = []
    for _ in range(max(1, calls)):
        start = time.thread_time_ns()
        call()
        times.append((time.thread_time_ns() - start) / 1000)
    return statistics.median(times)


def measure(call, unit, calls: int, warmup: int = 3, batches: int = 7) -> tuple:
    """(µs of CPU thread time per call, units, launches per call, host reads per call, µs of
    the unit: its fastest batch's median). The calls run in ``batches``, each right after a
    batch of the trivial launch ``unit``: a shared machine has slow spells that make a stretch
    of calls up to 2x slower, and a row and its unit measured back to back slow down together.
    µs is the fastest batch's median; units the median over the batches of the row's median
    over its unit's."""
    for _ in range(warmup):  # the first call compiles and builds the launch plans
        call()
        unit()
    LAUNCHES[0] = 0
    with HostReads() as reads:
        call()
    launches, host_reads = LAUNCHES[0], reads.count
    times, ratios, unit_times = [], [], []
    for _ in range(batches):
        unit_times.append(_median_time(unit, UNIT_CALLS))
        times.append(_median_time(call, calls // batches))
        ratios.append(times[-1] / unit_times[-1])
    return min(times), statistics.median(ratios), launches, host_reads, min(unit_times)


UNIT_CALLS = 25  # trivial launches timed before each batch of a row


def run(rows: list[str], calls: int) -> list[dict]:
    """Measure ``rows`` (names of :data:`ROWS`), each against the unit, a trivial launch, timed
    in turn with it (see :func:`measure`)."""
    install_stand_in()
    torch.manual_seed(0)
    trivial = _trivial()
    results, unit_times = [], []
    for name in rows:
        label, build = ROWS[name]
        repeats = max(7, calls // 10) if name.startswith("gpt2_step") else calls
        us, units, launches, reads, unit_us = measure(build(), trivial, repeats)
        results.append(
            dict(row=name, label=label, us=us, units=units, launches=launches, host_reads=reads)
        )
        unit_times.append(unit_us)
        print(
            f"{name:24s} {us:9.1f} µs {units:7.1f} units {launches:4d} launches "
            f"{reads:3d} host reads (unit {unit_us:.1f} µs)",
            file=sys.stderr,
        )
    return results, statistics.median(unit_times)


def markdown(results: list[dict], unit: float, machine: str) -> str:
    lines = [
        f"# Host time per call ({machine}, torch {torch.__version__}, Triton {triton.__version__})",
        "",
        "`python scripts/bench_host.py`: CPU thread time of one call with Triton's driver",
        "replaced by a stand-in (every kernel compiled for sm_90, no driver call). Each row runs",
        "in seven batches, each right after a batch of trivial launches: µs is the fastest",
        "batch's median, units the median over the batches of the row's median over the trivial",
        f"launch's ({unit:.1f} µs here, the median of its fastest batches), so that a slow spell",
        "of the machine cancels out.",
        "",
        "| path | µs per call | units of a trivial launch | launches | host reads (syncs) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['us']:.1f} | {r['units']:.1f} | {r['launches']} | "
            f"{r['host_reads']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS")
    p.add_argument("--calls", type=int, default=200, help="timed calls per row")
    p.add_argument(
        "--out",
        default=None,
        help="markdown file, - for stdout (default benchmarks/results/host_<machine>.md)",
    )
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    torch.set_num_threads(1)
    results, unit = run(rows, args.calls)
    text = markdown(results, unit, machine_name())
    if args.out == "-":
        print(text)
        return
    out = args.out or f"benchmarks/results/host_{machine_name()}.md"
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
