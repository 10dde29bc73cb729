"""One finetuning step of a transformers Llama-style model: sdpa against our ops.

    PYTHONPATH=. python scripts/bench_hf.py                      # 8k tokens, markdown to stdout
    PYTHONPATH=. python scripts/bench_hf.py --tokens 2048 --out benchmarks/results/hf_cpu-2core.md

The model: 4 layers, hidden 512, 8 query heads sharing 2 key/value heads, SwiGLU MLP of 1536,
vocabulary 32k and 128k, random weights (LlamaForCausalLM from a config, fp32 on CPU, bf16 on
GPU). A step is forward with labels, backward, AdamW step, on ``--tokens`` tokens per batch
(``--seqlen`` tokens per sequence). Two variants start from the same weights:

- sdpa: ``attn_implementation="sdpa"``, transformers' modules and loss (full logits);
- ours: ``attn_implementation="flash_attn_triton"`` + ``apply_fused_ops`` (norms, rotary, MLP,
  linear cross-entropy without the logits).

Reported: median step time over ``--repeats`` steps after one warm-up step, tokens/s, and the
peak memory of a step beyond what was live before it (weights, optimizer state; see
``benchmarks.common.peak_memory``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import checkout_path  # noqa: F401 (the checkout's flash_attn and benchmarks/)
import torch

from benchmarks.common import benchmark_time, machine_name, peak_memory

VOCABS = (32_000, 128_000)
VARIANTS = ("sdpa", "ours")


def build(variant: str, vocab: int, device: str, dtype: torch.dtype):
    """A Llama-style LlamaForCausalLM (see the module docstring) and its AdamW optimizer."""
    import transformers

    import flash_attn.integrations.transformers as fa

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    attn = "sdpa" if variant == "sdpa" else fa.ATTENTION_NAME
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)
    model = model.to(device=device, dtype=dtype).train()
    if variant == "ours":
        fa.apply_fused_ops(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def measure(variant: str, vocab: int, ids: torch.Tensor, repeats: int, dtype) -> dict:
    """Step time (median s), tokens/s and step peak memory (bytes) of one variant."""
    model, optimizer = build(variant, vocab, ids.device.type, dtype)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = benchmark_time(step, warmup=1, repeats=repeats, device=ids.device)
    peak = peak_memory(step, device=ids.device)
    return dict(seconds=timing.median_s, tokens_per_s=ids.numel() / timing.median_s, peak=peak)


def report(results: dict, args, command: str, device: str) -> str:
    """Markdown: one row per vocabulary, sdpa and ours side by side, and their ratios."""
    gib = 2**30
    lines = [
        "# transformers finetuning step: sdpa against flash_attn_triton + apply_fused_ops",
        "",
        f"Machine: {machine_name(device)}, {platform.machine()}; torch {torch.__version__}. "
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}`. Load average at the "
        f"end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"Llama-style model: 4 layers, hidden 512, GQA 8:2 heads, SwiGLU 1536; {args.tokens} "
        f"tokens per step ({args.tokens // args.seqlen} x {args.seqlen}); forward + backward + "
        f"AdamW; median of {args.repeats} steps after a warm-up step. Peak memory: bytes live "
        "during a step beyond the weights and optimizer state held before it.",
        "",
        "| vocab | sdpa tokens/s | ours tokens/s | speed-up | sdpa peak (GiB) | ours peak (GiB) "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for vocab, (sdpa, ours) in results.items():
        lines.append(
            f"| {vocab:,} | {sdpa['tokens_per_s']:,.0f} | {ours['tokens_per_s']:,.0f} "
            f"| {ours['tokens_per_s'] / sdpa['tokens_per_s']:.2f}x | {sdpa['peak'] / gib:.2f} "
            f"| {ours['peak'] / gib:.2f} | {ours['peak'] / sdpa['peak']:.2f}x |"
        )
    lines += ["", "Targets: ours peak <= 0.5x sdpa's at vocab 128k; ours tokens/s >= 1.0x sdpa's."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.tokens % args.seqlen:
        parser.error("--tokens must be a multiple of --seqlen")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {}
    for vocab in VOCABS:
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (args.tokens // args.seqlen, args.seqlen), device=device)
        results[vocab] = [measure(v, vocab, ids, args.repeats, dtype) for v in VARIANTS]
        print(f"vocab {vocab}: {results[vocab]}", file=sys.stderr)
    command = "PYTHONPATH=. python scripts/bench_hf.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = report(results, args, command.strip(), device)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
