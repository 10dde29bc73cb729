"""Hugging Face checkpoints in and out: find the files, pick the family converter, check keys.

A family module (``gpt2.py``, ``gpt_neox.py``, ``llama.py``, ``opt.py``, ``gptj.py``) provides:

- ``ARCHITECTURES``: the ``config.json`` architectures it reads;
- ``config_from_hf(hf_config: dict) -> dict`` of :class:`~flash_attn.models.gpt.GPTConfig` fields;
- ``WEIGHT_MAP``: Hugging Face key template -> our key template (``{}`` is the layer index),
  applied by :func:`rename_weights`, with ``merge_hf`` for tensors that several Hugging Face
  tensors make up (q, k, v -> Wqkv);
- optionally ``config_to_hf`` and ``state_dict_to_hf`` for :func:`save_pretrained`.

Loading never leaves a weight at its random init: keys the model lacks, or that the checkpoint
lacks, are an error that lists them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import torch

# family module name -> architectures listed in its ARCHITECTURES (checked in tests).
FAMILIES = ("gpt2", "gpt_neox", "llama", "opt", "gptj")
SUPPORTED = {
    "gpt2": ("GPT2LMHeadModel",),
    "gpt_neox": ("GPTNeoXForCausalLM",),
    "llama": ("LlamaForCausalLM", "MistralForCausalLM"),
    "opt": ("OPTForCausalLM",),
    "gptj": ("GPTJForCausalLM",),
}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def family_module(name: str):
    """The converter module ``flash_attn.models.<name>``."""
    return importlib.import_module(f"flash_attn.models.{name}")


def family_of(hf_config: dict) -> str:
    """Family module name for a config.json dict; ValueError listing the supported ones."""
    archs = hf_config.get("architectures") or []
    for family, names in SUPPORTED.items():
        if any(a in names for a in archs):
            return family
    supported = sorted(a for names in SUPPORTED.values() for a in names)
    got = archs or hf_config.get("model_type")
    raise ValueError(f"unsupported architecture {got!r}; supported: {supported}")


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; else a hub id downloaded with huggingface_hub (needs a network)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path!r} is a file; pass the checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ValueError(
            f"{name_or_path!r} is not a local folder and huggingface_hub is not installed"
        ) from err
    # safetensors when the repository has them, else the PyTorch .bin files (both cached, so
    # a downloaded checkpoint also loads offline with HF_HUB_OFFLINE=1).
    folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.bin"]))
    return folder


def load_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, pytorch_model.bin (loaded with
    weights_only=True) or their sharded ``*.index.json`` forms."""
    files = []
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if (folder / name).exists():
            files = [folder / name]
        elif index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        if files:
            break
    if not files:
        raise FileNotFoundError(f"no {' or '.join(_WEIGHT_FILES)} (or sharded index) in {folder}")
    state_dict = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict.update(load_file(str(file)))
        else:
            state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
    return state_dict


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def rename_weights(state_dict: dict, weight_map: dict[str, str], ignore: tuple[str, ...] = ()):
    """Rename keys by templates. Returns (renamed dict, keys matching no template).

    ignore: regexes of keys to drop (buffers such as rotary inv_freq or causal masks).
    """
    compiled = [(_template_regex(src), dst) for src, dst in weight_map.items()]
    out, unexpected = {}, []
    for key, tensor in state_dict.items():
        if any(re.search(pattern, key) for pattern in ignore):
            continue
        for regex, dst in compiled:
            match = regex.match(key)
            if match:
                out[dst.format(*match.groups())] = tensor
                break
        else:
            unexpected.append(key)
    return out, unexpected


def invert(weight_map: dict[str, str]) -> dict[str, str]:
    """{ours: theirs} from {theirs: ours} (for saving back to the Hugging Face layout)."""
    return {dst: src for src, dst in weight_map.items()}


def _pad_vocab(state_dict: dict, config) -> None:
    """Zero rows past vocab_size in the embedding and LM head (never reach the logits)."""
    padded = config.padded_vocab_size
    for key in ("transformer.embeddings.wte.weight", "lm_head.weight", "lm_head.bias"):
        tensor = state_dict.get(key)
        if tensor is not None and tensor.shape[0] < padded:
            pad = tensor.new_zeros((padded - tensor.shape[0], *tensor.shape[1:]))
            state_dict[key] = torch.cat([tensor, pad])


def load_pretrained(model_cls, name_or_path, dtype=None, device=None, **config_overrides):
    """Build ``model_cls`` from a Hugging Face checkpoint (see ``from_pretrained``)."""
    from flash_attn.models.gpt import GPTConfig

    folder = resolve_folder(name_or_path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf_config = json.loads(config_file.read_text())
    family = family_of(hf_config)
    module = family_module(family)
    try:
        fields = module.config_from_hf(hf_config)
    except KeyError as err:
        raise ValueError(f"{config_file} lacks the field {err.args[0]!r} for {family}") from err
    fields.update(config_overrides)
    fields["extra"] = {**fields.get("extra", {}), "hf_family": family}
    config = GPTConfig(**fields)

    hf_state_dict = load_hf_state_dict(folder)
    if hasattr(module, "merge_hf"):
        hf_state_dict = module.merge_hf(hf_state_dict, config)
    state_dict, unexpected = rename_weights(
        hf_state_dict, module.WEIGHT_MAP, getattr(module, "IGNORE", ())
    )
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    _pad_vocab(state_dict, config)

    model = model_cls(config, device=device, dtype=dtype)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(unexpected) | (set(state_dict) - expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(name_or_path)!r} does not match the {family} layout: "
            f"missing weights {missing}, unexpected weights {unexpected}"
        )
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=False)
    return model


def save_pretrained(model, path, family: str | None = None) -> None:
    """config.json + model.safetensors in the Hugging Face layout of ``family`` (default: the
    family it was loaded from, else "llama" for RMSNorm models and "gpt2" otherwise)."""
    from safetensors.torch import save_file

    config = model.config
    if family is None:
        family = config.extra.get("hf_family") or (
            "llama" if config.norm_type == "rmsnorm" else "gpt2"
        )
    module = family_module(family) if family in FAMILIES else None
    if module is None or not hasattr(module, "state_dict_to_hf"):
        raise ValueError(f"save_pretrained supports the 'gpt2' and 'llama' layouts, got {family!r}")
    hf_config = module.config_to_hf(config)
    state_dict = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    vocab = config.vocab_size
    for key in ("transformer.embeddings.wte.weight", "lm_head.weight", "lm_head.bias"):
        if key in state_dict:
            state_dict[key] = state_dict[key][:vocab]
    hf_state_dict = module.state_dict_to_hf(state_dict, config)
    hf_state_dict = {k: v.detach().contiguous().clone().cpu() for k, v in hf_state_dict.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config["torch_dtype"] = str(next(iter(hf_state_dict.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(hf_state_dict, str(path / "model.safetensors"), metadata={"format": "pt"})
