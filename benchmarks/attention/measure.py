"""The attention methods compared, and the time, memory and profile of one :class:`Case`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.attention.case import (
    DTYPES,
    FLASH,
    METHODS,
    MODES,
    Case,
    Result,
    check_fits,
)
from benchmarks.common import attention_flops, benchmark_time, peak_memory, tflops
from flash_attn.ops.attention.reference import attention_ref
from flash_attn.ops.attention.tiled import attention_tiled
from flash_attn.ops.backend import resolve_backend


def _sdpa(q, k, v, causal, mask):
    # (B, S, H, D) -> (B, H, S, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    attn_mask, is_causal = mask, False
    if causal and mask is None and seqlen_q == seqlen_k:
        is_causal = True
    elif causal and mask is None:
        from torch.nn.attention.bias import causal_lower_right

        attn_mask = causal_lower_right(seqlen_q, seqlen_k)  # the project's alignment
    elif causal:
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        attn_mask = mask & (j <= i + (seqlen_k - seqlen_q))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)


def attention_fn(case: Case, mask: torch.Tensor | None):
    """fn(q, k, v) -> out for the case's method; q (B, Sq, H, D), k and v (B, Sk, H_k, D),
    mask None or (B, H, Sq, Sk) bool (True: attend)."""
    if case.method in FLASH:
        if mask is not None:
            raise ValueError(
                "--type flash does not take --mask random: the kernels have no arbitrary mask "
                "(use --type reference, normal or sdpa)"
            )
        from flash_attn import flash_attn_func

        options = dict(causal=case.causal, backend=case.backend)
        options.update(deterministic=case.method == "flash_deterministic")
        return lambda q, k, v: flash_attn_func(q, k, v, **options)
    if case.method == "normal":
        return lambda q, k, v: attention_ref(q, k, v, causal=case.causal, attn_bias=mask)[0]
    if case.method == "sdpa":
        return lambda q, k, v: _sdpa(q, k, v, case.causal, mask)
    if case.method == "reference":
        return lambda q, k, v: attention_tiled(
            q, k, v, causal=case.causal, mask=mask, block_m=case.block_m, block_n=case.block_n
        )
    raise ValueError(f"type must be one of {METHODS}, got {case.method!r}")


def _check_sizes(case: Case) -> None:
    """ValueError naming the command-line argument of a size that cannot run."""
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")
    names = ("b", "h", "h_k", "q_len", "kv_len", "d", "block_m", "block_n")
    values = (
        case.batch,
        case.nheads,
        case.nheads_k,
        case.seqlen_q,
        case.seqlen_k,
        case.headdim,
        case.block_m,
        case.block_n,
    )
    for name, value in zip(names, values):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if case.nheads % case.nheads_k:
        raise ValueError(f"h ({case.nheads}) must be a multiple of h_k ({case.nheads_k})")
    if case.method in FLASH:
        resolve_backend(case.backend, torch.device(case.device))  # ValueError if unservable


def make_step(case: Case):
    """Allocate the inputs; return (step, flops): step() runs the case's mode once."""
    _check_sizes(case)
    check_fits(case)
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    grad = case.mode != "fwd"
    shape_q = (case.batch, case.seqlen_q, case.nheads, case.headdim)
    shape_k = (case.batch, case.seqlen_k, case.nheads_k, case.headdim)
    q, k, v = (
        torch.randn(s, device=device, dtype=dtype, requires_grad=grad)
        for s in (shape_q, shape_k, shape_k)
    )
    mask = None
    if case.mask == "random":
        mask = torch.rand(case.batch, case.nheads, case.seqlen_q, case.seqlen_k, device=device)
        mask = mask < 0.5
    fn = attention_fn(case, mask)
    sizes = (case.batch, case.nheads, case.seqlen_q, case.seqlen_k, case.headdim)
    flops = attention_flops(*sizes, causal=case.causal, mask=mask, mode=case.mode)
    if case.mode == "fwd":

        def step():
            with torch.no_grad():
                fn(q, k, v)

    elif case.mode == "bwd":
        out = fn(q, k, v)
        dout = torch.randn_like(out)

        def step():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    else:
        dout = torch.randn(shape_q, device=device, dtype=dtype)

        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

    return step, flops


def run_case(
    case: Case, repeats: int = 3, warmup: int = 1, memory: bool = True, timing: bool = True
) -> Result:
    """Time (median of ``repeats``) and measure the peak memory of one case."""
    step, flops = make_step(case)
    result = Result(case)
    if timing:
        t = benchmark_time(step, warmup=warmup, repeats=repeats, device=case.device)
        result.time_s, result.tflops = t.median_s, tflops(flops, t.median_s)
    if memory:
        result.peak_bytes = peak_memory(step, device=case.device)
    return result


def profile_case(case: Case, trace_path: Path, repeats: int = 3, rows: int = 15) -> str:
    """Record a Chrome trace of ``repeats`` steps; return the table of the top operators."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(case)
    step()  # warmup outside the trace
    on_cuda = case.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)
