"""Tokens/s of the two data paths on one CPU core: streaming (tokenize while training) against
reading windows of the cached memmap.

    python scripts/bench_data.py                  # markdown to stdout
    python scripts/bench_data.py --out benchmarks/results/data_cpu-2core.md

No network: the text is the standard library's Python sources (the quickstart corpus), one
document per file, written as jsonl; the tokenizer is a byte-level BPE with GPT-2's
vocabulary size (50,257) and pre-tokenizer, trained here with ``tokenizers`` on that text
(GPT-2's own tokenizer cannot be downloaded here; the same kind of BPE costs about the same
per token). Both paths run through ``GPTDataModule``'s train loader in the main process
(num_workers=0, one torch thread, tokenizers without its thread pool), so the figures are
per core: a GPU that consumes R tokens/s needs about R / streaming tokens/s loader workers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import checkout_path  # noqa: F401 (the checkout's flash_attn, benchmarks/ and training/)
import torch

from benchmarks.common import machine_name
from training.data.datamodule import GPTDataModule
from training.data.sources import quickstart_files

GPT2_VOCAB = 50_257
GPU_DEMAND = 300_000  # tokens/s of GPT-2 small training on one H100 (order of magnitude)


def write_corpus(folder: Path, max_bytes: int) -> Path:
    """The quickstart corpus as one jsonl file of documents."""
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for source in quickstart_files(max_bytes):
            text = source.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
    return path


def datamodule(corpus: Path, cache: Path, streaming: bool, seq_len: int) -> GPTDataModule:
    source = {"kind": "files", "data_files": str(corpus), "val_fraction": 0.05}
    tokenizer = {"kind": "bpe", "vocab_size": GPT2_VOCAB, "train_bytes": 50_000_000}
    dm = GPTDataModule(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=8,
        cache_dir=str(cache),
        streaming=streaming,
        val_documents=10,
        pin_memory=False,
    )
    dm.setup("fit")
    return dm


def loader_rate(dm: GPTDataModule, max_tokens: int) -> float:
    """Training tokens/s of dm's train loader over about max_tokens tokens."""
    tokens, start = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        windows = batch["tokens"] if isinstance(batch, dict) else batch
        tokens += windows[:, :-1].numel()
        if tokens >= max_tokens:
            break
    return tokens / (time.perf_counter() - start)


def report(rows: list[tuple[str, float]], bytes_per_token: float, args, command: str) -> str:
    lines = [
        "# Data path: tokens/s per CPU core, streaming against the memmap cache",
        "",
        f"Machine: {machine_name('cpu')}, {platform.machine()}; torch {torch.__version__}. "
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}`. Load average at the "
        f"end (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"Text: {args.mbytes} MB of the standard library's Python sources (one document per "
        f"file). Tokenizer: byte-level BPE of {GPT2_VOCAB:,} tokens with GPT-2's pre-tokenizer, "
        f"trained here (GPT-2's own is not downloadable here), {bytes_per_token:.2f} bytes per "
        f"token on this text. Windows of {args.seq_len} + 1 tokens, batches of 8, one core.",
        "",
        "| path | tokens/s per core | loader workers for 300k tokens/s |",
        "|---|---|---|",
    ]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} | {max(1, -(-GPU_DEMAND // int(rate)))} |")
    lines += [
        "",
        "GPT-2 small trains at a few hundred thousand tokens/s on one H100: streaming needs "
        "about that many data.num_workers per GPU, with headroom (a busy or slower core, "
        "reading from the hub); the memmap path needs no more than one. The data configs "
        "stream with 4 workers per GPU.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbytes", type=int, default=8, help="MB of text")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens timed per path")
    parser.add_argument("--out", help="write the markdown here")
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp), args.mbytes * 1_000_000)
        cache = Path(tmp) / "cache"
        memmap = datamodule(corpus, cache, streaming=False, seq_len=args.seq_len)
        stream = datamodule(corpus, cache, streaming=True, seq_len=args.seq_len)
        counts = memmap.token_bytes().numpy()
        tokens = memmap.datasets["train"].tokens
        bytes_per_token = float(counts[tokens].sum()) / len(tokens)
        rows = [
            ("streaming (read, tokenize, pack)", loader_rate(stream, args.tokens)),
            ("memmap (random windows of the cache)", loader_rate(memmap, args.tokens)),
        ]
    print(rows, file=sys.stderr)
    command = "PYTHONPATH=. python scripts/bench_data.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = report(rows, bytes_per_token, args, command.strip())
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
