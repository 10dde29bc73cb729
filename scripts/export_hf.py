"""Write the Hugging Face folder of a training checkpoint.

    python scripts/export_hf.py outputs/finetune/<time>/checkpoints/last.ckpt out/

out/ gets config.json, model.safetensors, generation_config.json and the tokenizer, as the
``hf/`` folder a run ends with: ``AutoModelForCausalLM.from_pretrained("out/")``,
``AutoTokenizer.from_pretrained("out/")`` and ``scripts/generate.py --checkpoint out/`` open it.
A checkpoint carries its model settings and tokenizer; for one written without them, pass
--tokenizer (the tokenizer the run trained with: a folder, hub id or tokenizer.json).
"""

from __future__ import annotations

import argparse

import checkout_path  # noqa: F401 (makes training/ importable)

from training.hf_export import export_checkpoint


def main(argv=None) -> str:
    """Export and print the folder; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt written by train.py")
    parser.add_argument("out", help="the folder to write (created if needed)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder, hub id or tokenizer.json (default: the checkpoint's)",
    )
    args = parser.parse_args(argv)
    folder = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer)
    print(folder)
    return str(folder)


if __name__ == "__main__":
    main()
