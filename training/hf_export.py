"""A run's Hugging Face folder (``<run>/hf``): weights, config.json, generation_config.json and
the tokenizer, which ``transformers`` and ``scripts/generate.py`` open unchanged.

:class:`HuggingFaceFolder` writes the tokenizer there when fitting starts (so the run folder
names its tokenizer) and the model when fitting ends. Every checkpoint also carries what the
folder needs besides the weights (under :data:`CHECKPOINT_KEY`: the GPTConfig, the special
tokens and the tokenizer's files), so :func:`export_checkpoint` (``scripts/export_hf.py``)
writes one from any checkpoint, without the folder the model was loaded from.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from flash_attn.models.gpt import GPTConfig, GPTLMHeadModel
from flash_attn.models.hf_checkpoint import SpecialTokens, writable_family
from training.checkpointing import load_verified

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "hf_export"


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """name -> content of the files a transformers tokenizer's save_pretrained writes."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes]):
    """The transformers tokenizer of :func:`tokenizer_files`' output."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).write_bytes(content)
        return AutoTokenizer.from_pretrained(folder)


def export_metadata(model: GPTLMHeadModel, tokenizer=None) -> dict:
    """What a checkpoint needs besides the weights to become a Hugging Face folder: plain
    containers only, so ``torch.load(weights_only=True)`` reads it."""
    special = model.hf_special_tokens or SpecialTokens()
    return {
        "config": model.config.to_dict(),
        "special_tokens": dataclasses.asdict(special),
        "tokenizer_files": None if tokenizer is None else tokenizer_files(tokenizer),
    }


def write_hf_folder(folder, metadata: dict, state_dict: dict, tokenizer=None) -> Path:
    """Write the Hugging Face folder of a LightningModule state dict (keys ``model.*``).

    tokenizer: a transformers tokenizer (default: the one metadata carries, if any).
    """
    config = GPTConfig(**metadata["config"])
    weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    model = GPTLMHeadModel(config, device="meta")  # no memory: the weights are assigned below
    model.load_state_dict(weights, assign=True)
    model.hf_special_tokens = SpecialTokens(**metadata["special_tokens"])
    if tokenizer is None and metadata.get("tokenizer_files"):
        tokenizer = tokenizer_from_files(metadata["tokenizer_files"])
    model.save_pretrained(folder, tokenizer=tokenizer)
    return Path(folder)


class HuggingFaceFolder(L.Callback):
    """Writes the run's Hugging Face folder (see the module docstring) into ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metadata is not None:
            return
        text_tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        tokenizer = None if text_tokenizer is None else text_tokenizer.to_transformers()
        self.metadata = export_metadata(pl_module.model, tokenizer)
        if trainer.is_global_zero and tokenizer is not None:
            tokenizer.save_pretrained(str(self.folder))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.metadata

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            writable_family(pl_module.model.config)
        except ValueError as err:
            log.warning("no Hugging Face folder for this architecture: %s", err)
            return
        state_dict = _full_state_dict(trainer)
        if trainer.is_global_zero:
            write_hf_folder(self.folder, self.metadata, state_dict)
            log.info("Hugging Face folder: %s", self.folder)


def _full_state_dict(trainer: L.Trainer) -> dict:
    """The LightningModule's whole state dict (keys ``model.*``). A collective under FSDP (the
    full weights gathered to CPU): every rank calls it. Lightning's own state dict is sharded
    when the strategy saves sharded checkpoints, so FSDP asks torch for the full one."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return trainer.strategy.lightning_module_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # gathered to CPU from GPUs; for CPU processes (gloo) the tensors are there already
    offload = trainer.strategy.root_device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    return get_model_state_dict(trainer.strategy.model, options=options)


def export_checkpoint(checkpoint_path, folder, tokenizer: str | None = None) -> Path:
    """Write the Hugging Face folder of a training checkpoint (.ckpt).

    tokenizer: a tokenizer folder, hub id or tokenizer.json replacing the checkpoint's (needed
    for checkpoints that carry none). Raises ValueError naming what is missing, and
    CheckpointError naming the file when it is damaged or not a checkpoint: it is verified as
    a resume verifies it (every record's CRC-32, weights_only loading).
    """
    checkpoint = load_verified(checkpoint_path, map_location="cpu")
    metadata = checkpoint.get(CHECKPOINT_KEY)
    hf_tokenizer = None
    if tokenizer is not None:
        from training.data.tokenizer import build_tokenizer

        hf_tokenizer = build_tokenizer("pretrained", tokenizer).to_transformers()
    if metadata is None:
        metadata = _metadata_from_hyperparameters(checkpoint, checkpoint_path, hf_tokenizer)
    if hf_tokenizer is None and not metadata.get("tokenizer_files"):
        raise ValueError(
            f"{checkpoint_path} carries no tokenizer; pass the one the run trained with: "
            "--tokenizer <tokenizer folder, hub id or tokenizer.json>"
        )
    return write_hf_folder(folder, metadata, checkpoint["state_dict"], hf_tokenizer)


def _metadata_from_hyperparameters(checkpoint: dict, path, tokenizer) -> dict:
    """Export metadata of a checkpoint written without it: the model rebuilt from the
    LightningModule's hyperparameters (its pretrained folder, when it has one, must exist)."""
    if tokenizer is None:
        raise ValueError(
            f"{path} was written without its tokenizer and model settings; pass the tokenizer "
            "the run trained with: --tokenizer <tokenizer folder, hub id or tokenizer.json>"
        )
    from training.settings import ModelSettings

    hparams = checkpoint["hyper_parameters"]
    model = ModelSettings.from_config(hparams["model"]).build(hparams.get("vocab_size"))
    return export_metadata(model)
