"""Benchmarks of the attention features beyond dense batches.

1. window: sliding window (left = --window, causal) against full causal attention at --seqlen.
2. varlen: a batch with lengths drawn from 64..--max-len, packed (flash_attn_varlen_func)
   against the same batch padded to the longest sequence; time per real token.
3. decode: one new token per step against a --cache-len KV cache (flash_attn_with_kvcache)
   against PyTorch SDPA on the same cache; tokens/s.

    python scripts/bench_attention_features.py --device cpu            # CPU, torch backend
    python scripts/bench_attention_features.py --device cuda --dtype bf16

Writes a markdown table to benchmarks/results/attention_features_<machine>.md (--out to change).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib

import checkout_path  # noqa: F401 (the checkout's flash_attn and benchmarks/)
import torch
import torch.nn.functional as F

from benchmarks.common import benchmark_time, machine_name
from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _time(fn, args, device):
    return benchmark_time(fn, warmup=1, repeats=args.repeats, device=device).median_s


def _fwd_bwd(fn, *tensors):
    def run():
        out = fn(*tensors)
        out.backward(torch.ones_like(out))

    return run


def bench_window(args, device, dtype):
    """Rows: (mode, full causal s, window s, speed-up)."""
    shape = (1, args.seqlen, args.heads, args.headdim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    full = lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend=args.backend)  # noqa: E731

    def windowed(q, k, v):
        return flash_attn_func(
            q, k, v, causal=True, window_size=(args.window, 0), backend=args.backend
        )

    rows = []
    for mode in ("fwd", "fwd_bwd"):
        if mode == "fwd":
            with torch.no_grad():
                t_full = _time(lambda: full(q, k, v), args, device)
                t_window = _time(lambda: windowed(q, k, v), args, device)
        else:
            t_full = _time(_fwd_bwd(full, q, k, v), args, device)
            t_window = _time(_fwd_bwd(windowed, q, k, v), args, device)
        rows.append((mode, t_full, t_window, t_full / t_window))
    return rows


def bench_varlen(args, device, dtype):
    """(real tokens, padded tokens, packed s, padded s)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, args.max_len + 1, (args.batch,), generator=generator)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    total, longest = int(lengths.sum()), int(lengths.max())
    packed = [
        torch.randn(total, args.heads, args.headdim, device=device, dtype=dtype) for _ in "qkv"
    ]
    padded = [
        torch.randn(args.batch, longest, args.heads, args.headdim, device=device, dtype=dtype)
        for _ in "qkv"
    ]
    with torch.no_grad():
        t_packed = _time(
            lambda: flash_attn_varlen_func(
                *packed, cu, cu, longest, longest, causal=True, backend=args.backend
            ),
            args,
            device,
        )
        t_padded = _time(
            lambda: flash_attn_func(*padded, causal=True, backend=args.backend), args, device
        )
    return total, args.batch * longest, t_packed, t_padded


def bench_decode(args, device, dtype):
    """(ours tokens/s, SDPA tokens/s) for one-token decoding steps against a full cache."""
    batch, heads, headdim = args.decode_batch, args.heads, args.headdim
    cache = [
        torch.randn(batch, args.cache_len + 1, heads, headdim, device=device, dtype=dtype)
        for _ in "kv"
    ]
    q = torch.randn(batch, 1, heads, headdim, device=device, dtype=dtype)
    new = torch.randn(batch, 1, heads, headdim, device=device, dtype=dtype)
    seqlens = torch.full((batch,), args.cache_len, dtype=torch.int32, device=device)

    def ours():
        flash_attn_with_kvcache(
            q,
            cache[0],
            cache[1],
            new,
            new,
            cache_seqlens=seqlens,
            causal=True,
            backend=args.backend,
        )

    def sdpa():
        # The same work by hand: append, then attend to the valid prefix.
        cache[0][:, args.cache_len] = new[:, 0]
        cache[1][:, args.cache_len] = new[:, 0]
        F.scaled_dot_product_attention(
            q.transpose(1, 2), cache[0].transpose(1, 2), cache[1].transpose(1, 2)
        )

    with torch.no_grad():
        t_ours, t_sdpa = _time(ours, args, device), _time(sdpa, args, device)
    return batch / t_ours, batch / t_sdpa


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on CPU"
    )
    parser.add_argument("--backend", default=None, help="auto (default), triton or torch")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=16384, help="window benchmark length")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="varlen benchmark batch")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads); 1 is steadier on a busy machine",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    machine = machine_name(device)
    backend = args.backend or "auto"

    lines = [
        f"# Attention features: {machine}",
        "",
        f"`python scripts/bench_attention_features.py --device {args.device}` on "
        f"{datetime.date.today()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, backend {backend}, {str(dtype).removeprefix('torch.')}, {args.heads} heads of "
        f"{args.headdim}, median of {args.repeats} runs.",
        "",
        f"## Sliding window {args.window} vs full causal, seqlen {args.seqlen}",
        "",
        "| mode | full causal (ms) | window (ms) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for mode, t_full, t_window, speedup in bench_window(args, device, dtype):
        lines.append(f"| {mode} | {t_full * 1e3:.1f} | {t_window * 1e3:.1f} | {speedup:.1f}x |")
    real, padded, t_packed, t_padded = bench_varlen(args, device, dtype)
    lines += [
        "",
        f"## Varlen vs padded, batch {args.batch}, lengths 64..{args.max_len}, causal fwd",
        "",
        "| layout | tokens | ms | us per real token |",
        "|---|---:|---:|---:|",
        f"| packed (varlen) | {real} | {t_packed * 1e3:.1f} | {t_packed / real * 1e6:.2f} |",
        f"| padded | {padded} | {t_padded * 1e3:.1f} | {t_padded / real * 1e6:.2f} |",
        "",
        f"Real tokens are {real / padded:.0%} of the padded batch; packed takes "
        f"{t_packed / t_padded:.0%} of the padded time.",
    ]
    ours, sdpa = bench_decode(args, device, dtype)
    lines += [
        "",
        f"## Single-token decode, cache {args.cache_len}, batch {args.decode_batch}",
        "",
        "| method | tokens/s |",
        "|---|---:|",
        f"| flash_attn_with_kvcache | {ours:.1f} |",
        f"| PyTorch SDPA | {sdpa:.1f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(args.out or f"benchmarks/results/attention_features_{machine}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
