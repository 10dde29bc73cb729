"""Checks that need no data, run before any data is downloaded or tokenized: the accelerator
the trainer asks for exists, the model can be built (a checkpoint's family is supported, read
from its config.json alone), and data.seq_len fits the model's positions. Each error names
the setting and what to use instead."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from flash_attn.models.gpt import GPTConfig
from flash_attn.models.hf_checkpoint import checkpoint_fields

_PLACEHOLDER_VOCAB = 50257  # the tokenizer's is known only after data work; sizes do not need it


def _visible_gpus(accelerator: str) -> int:
    """GPUs PyTorch sees for an accelerator name ("gpu": CUDA, else Apple's MPS)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = int(torch.backends.mps.is_available())
    return {"cuda": cuda, "mps": mps}.get(accelerator, cuda or mps)


def check_accelerator(trainer: DictConfig) -> None:
    """RuntimeError when trainer.accelerator asks for GPUs that this machine does not have
    (a CPU-only machine would otherwise build the whole dataset before Lightning fails)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    devices = trainer.get("devices", 1)
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    found = _visible_gpus(accelerator)
    if found >= wanted:
        return
    build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    raise RuntimeError(
        f"trainer.accelerator={accelerator} trainer.devices={devices}, but PyTorch sees "
        f"{found} GPU(s) (torch {torch.__version__}, {build}). On the CPU, add trainer=cpu "
        "(one process; debug=tiny for a quick check); on fewer GPUs, set trainer.devices."
    )


def model_config(model: DictConfig) -> tuple[GPTConfig, str]:
    """The GPTConfig a model config builds, without weights, and the setting its positions
    come from. A checkpoint (model.pretrained) is read from its config.json alone; a missing
    folder or an unsupported family is an error naming model.pretrained."""
    node = model.get("config")
    overrides = OmegaConf.to_container(node, resolve=True) if node else {}
    fields = {k: v for k, v in overrides.items() if v is not None}
    if model.get("pretrained"):
        try:
            fields = {**checkpoint_fields(str(model.pretrained)), **fields}
        except (FileNotFoundError, ValueError) as exc:
            error = FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError
            raise error(f"model.pretrained={model.pretrained}: {exc}") from exc
        return GPTConfig(**fields), f"the n_positions of model.pretrained={model.pretrained}"
    fields.setdefault("vocab_size", _PLACEHOLDER_VOCAB)
    config = GPTConfig.from_preset(model.preset, **fields) if model.preset else GPTConfig(**fields)
    return config, "model.config.n_positions"


def check_seq_len(seq_len: int, config: GPTConfig, positions_from: str) -> None:
    """ValueError when data.seq_len is longer than the model's learned positions."""
    limit = config.max_seqlen
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"data.seq_len={seq_len} is longer than the model's {limit} positions "
            f"({positions_from}); use data.seq_len={limit} or less"
        )


def check_before_data(cfg: DictConfig) -> None:
    """Every check of this module, in the order a user would fix them."""
    check_accelerator(cfg.trainer)
    config, positions_from = model_config(cfg.model)
    check_seq_len(int(cfg.data.seq_len), config, positions_from)
