"""Generate text from a Hugging Face-layout checkpoint folder with the KV cache.

    PYTHONPATH=. python scripts/generate.py --checkpoint PATH --prompt "Once upon a time"

PATH holds config.json, the weights and the tokenizer files: a transformers model and
tokenizer's ``save_pretrained`` folder, or the ``hf/`` folder a training run ends with
(``scripts/export_hf.py`` makes one from any checkpoint). Greedy with --top-k 1. The prompt
and the new tokens must fit in the model's context (n_positions).
"""

from __future__ import annotations

import argparse
import time

import torch

from flash_attn.models.gpt import GPTLMHeadModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Hugging Face-layout folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """ValueError naming --max-new-tokens when prompt + new tokens exceed the context (0: no
    limit known)."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if context and prompt_tokens + max_new_tokens > context:
        raise ValueError(
            f"the prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceed "
            f"the model's context of {context} tokens; use --max-new-tokens "
            f"{max(context - prompt_tokens, 0)} or less, or a shorter prompt"
        )


def main(argv=None) -> str:
    """Print and return the prompt followed by its continuation."""
    from transformers import AutoTokenizer

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = GPTLMHeadModel.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    check_context(input_ids.shape[1], args.max_new_tokens, model.config.n_positions)
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
    )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    new = out.shape[1] - input_ids.shape[1]
    print(text)
    print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s]")
    return text


if __name__ == "__main__":
    main()
