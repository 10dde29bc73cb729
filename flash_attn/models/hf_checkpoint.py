"""Hugging Face checkpoints in and out: find the files, pick the family converter, convert.

A family module (``gpt2.py``, ``gpt_neox.py``, ``llama.py``, ``opt.py``, ``gptj.py``) declares:

- ``ARCHITECTURES``: the ``config.json`` architectures it reads;
- ``config_from_hf(hf_config: dict) -> dict`` of :class:`~flash_attn.models.gpt.GPTConfig` fields;
- ``WEIGHT_MAP``: Hugging Face key template -> our key template (``{}`` is the layer index),
  and optionally ``IGNORE``: regexes of buffers to drop;
- optionally ``from_hf_layout(state_dict, fields)``: the checkpoint's tensors in the layout
  ``WEIGHT_MAP`` names (q, k, v stacked into one tensor, Conv1D transposed ...), keys still
  theirs;
- for saving, ``config_to_hf(config)`` and ``to_hf_layout(state_dict, config)``, the inverse.

This module knows nothing of the model: :func:`load_hf_checkpoint` returns GPTConfig fields, a
state dict under our names and the checkpoint's :class:`SpecialTokens`, and
:func:`save_hf_checkpoint` takes them back (with a tokenizer, see ``hf_tokenizer.py``);
``GPTLMHeadModel.from_pretrained`` and ``save_pretrained`` build and check the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

import flash_attn.models.gpt2 as gpt2
import flash_attn.models.gpt_neox as gpt_neox
import flash_attn.models.gptj as gptj
import flash_attn.models.llama as llama
import flash_attn.models.opt as opt
from flash_attn.models.hf_common import invert, rename_weights
from flash_attn.models.hf_tokenizer import save_tokenizer

# family name -> its converter module.
FAMILIES = {m.__name__.rpartition(".")[2]: m for m in (gpt2, gpt_neox, llama, opt, gptj)}
# family name -> the config.json architectures it reads.
SUPPORTED = {name: module.ARCHITECTURES for name, module in FAMILIES.items()}
_FAMILY_OF_ARCHITECTURE = {arch: name for name, archs in SUPPORTED.items() for arch in archs}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class SpecialTokens:
    """The special-token settings of a checkpoint, kept from loading to saving.

    ids: bos_token_id, eos_token_id, pad_token_id of config.json (None where unset).
    generation_config: generation_config.json as read (its eos_token_id may be a list, as in
        Llama 3), without transformers_version.
    """

    ids: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SPECIAL_TOKEN_FIELDS))
    generation_config: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, hf_config: dict) -> SpecialTokens:
        """The settings of a checkpoint folder whose config.json is ``hf_config``."""
        generation_file = folder / "generation_config.json"
        generation = read_json(generation_file) if generation_file.exists() else {}
        generation.pop("transformers_version", None)
        return cls({k: hf_config.get(k) for k in SPECIAL_TOKEN_FIELDS}, generation)

    def with_ids(self, ids: dict) -> SpecialTokens:
        """These settings with the non-None entries of ids (e.g. a tokenizer's) replacing
        theirs, in config.json and in generation_config.json alike; a list of ids (several
        stop tokens, as in Llama 3) that holds the new id stays as it is."""

        def merged(settings: dict) -> dict:
            out = dict(settings)
            for key, value in ids.items():
                held = isinstance(out.get(key), list) and value in out[key]
                if value is not None and not held:
                    out[key] = value
            return out

        return SpecialTokens(merged(self.ids), merged(self.generation_config))

    def generation_json(self) -> dict:
        """generation_config.json: the ids that are set, then the stored settings."""
        return {**{k: v for k, v in self.ids.items() if v is not None}, **self.generation_config}


def family_of(hf_config: dict) -> str:
    """Family name for a config.json dict; ValueError listing the supported architectures and
    pointing other families to the transformers integration."""
    for arch in hf_config.get("architectures") or []:
        if arch in _FAMILY_OF_ARCHITECTURE:
            return _FAMILY_OF_ARCHITECTURE[arch]
    got = hf_config.get("architectures") or hf_config.get("model_type")
    raise ValueError(
        f"unsupported architecture {got!r}; supported: {sorted(_FAMILY_OF_ARCHITECTURE)}. "
        "Any other family trains in transformers with this package's attention and fused ops: "
        "import flash_attn.integrations.transformers, then "
        'AutoModelForCausalLM.from_pretrained(..., attn_implementation="flash_attn_triton") '
        "and flash_attn.integrations.transformers.apply_fused_ops(model)"
    )


# A Hugging Face hub id: "name" or "owner/name", of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether name can only be a local path, never a Hugging Face hub id.

    A hub id is "name" or "owner/name" of letters, digits, "-", "_" and "." (not starting
    with "."). Anything else is a path: absolute, starting with "." or "~", with a backslash,
    more than one "/" or other characters; and so is "dir/name" when "dir" is a folder here
    (a local folder, not a hub owner).
    """
    text = os.fspath(name)
    if not _HUB_ID.fullmatch(text):
        return True
    first, slash, _ = text.partition("/")
    return bool(slash) and Path(first).is_dir()


def _local_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder name_or_path names here; None when it is a hub id (see looks_like_path).
    A file, or a path with no folder there, is an error naming it."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a folder path or hub id (str), got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{os.fspath(name_or_path)!r} is a file; pass the checkpoint folder")
    if looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"no checkpoint folder at {path.absolute()} (from {os.fspath(name_or_path)!r})"
        )
    return None


def _hub_download(repo_id: str, patterns: list[str]) -> Path:
    """The files of a hub repository that match patterns (cached); FileNotFoundError saying
    that repo_id is neither a local folder nor on the hub when the download fails."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ValueError(
            f"{repo_id!r} is not a local folder and huggingface_hub is not installed"
        ) from err
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as err:  # offline, no such repository, no access
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder (nothing at {Path(repo_id).absolute()}) nor "
            f"a repository the Hugging Face hub gives (no network, no such repository or no "
            f"access: {type(err).__name__}: {reason})"
        ) from err


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; else a hub id downloaded with huggingface_hub (needs a network).

    A name that can only be a path (see :func:`looks_like_path`) and is not a folder is a
    FileNotFoundError naming the folder; so is a hub id the hub does not give.
    """
    folder = _local_folder(name_or_path)
    if folder is not None:
        return folder
    # safetensors when the repository has them, else the PyTorch .bin files (both cached, so
    # a downloaded checkpoint also loads offline with HF_HUB_OFFLINE=1).
    repo_id = os.fspath(name_or_path)
    folder = _hub_download(repo_id, ["*.json", "*.safetensors"])
    if not any(folder.glob("*.safetensors")):
        folder = _hub_download(repo_id, ["*.json", "*.bin"])
    return folder


def _fields_of_config(folder: Path) -> tuple[dict, dict]:
    """(config.json, GPTConfig fields with hf_family) of a checkpoint folder."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf_config = read_json(config_file)
    family = family_of(hf_config)
    try:
        fields = FAMILIES[family].config_from_hf(hf_config)
    except KeyError as err:
        raise ValueError(f"{config_file} lacks the field {err.args[0]!r} for {family}") from err
    fields["hf_family"] = family
    return hf_config, fields


def checkpoint_fields(name_or_path: str | os.PathLike) -> dict:
    """GPTConfig fields (with ``hf_family``) of a Hugging Face checkpoint, from its config.json
    alone (a hub id downloads that file only): its architecture and sizes are checked before
    any weight is read. Raises as :func:`load_hf_checkpoint` does."""
    folder = _local_folder(name_or_path) or _hub_download(os.fspath(name_or_path), ["config.json"])
    return _fields_of_config(folder)[1]


def load_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, pytorch_model.bin (loaded with
    weights_only=True) or their sharded ``*.index.json`` forms."""
    files = []
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if (folder / name).exists():
            files = [folder / name]
        elif index.exists():
            files = _shard_files(folder, index)
        if files:
            break
    if not files:
        raise FileNotFoundError(f"no {' or '.join(_WEIGHT_FILES)} (or sharded index) in {folder}")
    state_dict = {}
    for file in files:
        state_dict.update(_read_weights(file))
    return state_dict


def read_json(file: Path) -> dict:
    """A JSON object file; ValueError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _shard_files(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names; ValueError naming the index when it has no
    weight_map or names a file outside folder (``../x`` or an absolute path)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map object")
    root = folder.resolve()
    files = []
    for shard in sorted(set(weight_map.values())):
        file = (folder / str(shard)).resolve()
        if not file.is_relative_to(root):
            raise ValueError(f"{index} names shard {shard!r}, outside the checkpoint folder")
        files.append(file)
    return files


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors or PyTorch weight file (weights_only=True); a damaged
    or missing file is an error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"weight file {file} is missing")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch.load raise many kinds for a damaged file
        raise ValueError(f"cannot read weight file {file}: {err}") from err


def load_hf_checkpoint(
    name_or_path: str | os.PathLike,
) -> tuple[dict, dict[str, torch.Tensor], SpecialTokens]:
    """GPTConfig fields, weights and special tokens of a Hugging Face checkpoint (local folder
    or hub id).

    Returns:
        (fields, state_dict, special_tokens): fields include ``hf_family``; state_dict is under
        our names with the checkpoint's vocab rows (not padded), and a key that no template of
        the family matches keeps its Hugging Face name, so that loading reports it as
        unexpected.
    """
    folder = resolve_folder(name_or_path)
    hf_config, fields = _fields_of_config(folder)
    module = FAMILIES[fields["hf_family"]]
    hf_state_dict = load_hf_state_dict(folder)
    if hasattr(module, "from_hf_layout"):
        hf_state_dict = module.from_hf_layout(hf_state_dict, fields)
    state_dict, unmatched = rename_weights(
        hf_state_dict, module.WEIGHT_MAP, getattr(module, "IGNORE", ())
    )
    state_dict.update((key, hf_state_dict[key]) for key in unmatched)
    return fields, state_dict, SpecialTokens.from_folder(folder, hf_config)


def writable_family(config) -> str:
    """The layout save_pretrained writes by default: ``config.hf_family``, else the first family
    whose ``config_to_hf`` accepts the architecture; ValueError listing why none does."""
    if config.hf_family:
        return config.hf_family
    reasons = []
    for name, module in FAMILIES.items():
        try:
            module.config_to_hf(config)
            return name
        except ValueError as err:
            reasons.append(str(err))
    raise ValueError("no Hugging Face layout holds this model:\n  " + "\n  ".join(reasons))


def save_hf_checkpoint(
    path,
    config,
    state_dict: dict,
    family: str | None = None,
    special_tokens: SpecialTokens | None = None,
    tokenizer=None,
) -> None:
    """Write a folder that transformers opens: config.json, model.safetensors,
    generation_config.json and, given a tokenizer, its files.

    Args:
        path: folder, created if needed.
        config: the model's GPTConfig.
        state_dict: the model's weights under our names, vocab rows not padded, a tied
            lm_head.weight left out.
        family: a name of :data:`FAMILIES` (default: :func:`writable_family`).
        special_tokens: bos/eos/pad ids and generation settings (default: none set).
        tokenizer: a transformers tokenizer or a ``tokenizers.Tokenizer`` (see
            :func:`~flash_attn.models.hf_tokenizer.save_tokenizer`); its bos/eos/pad ids
            replace those of special_tokens where it has them.
    """
    from safetensors.torch import save_file

    family = family or writable_family(config)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    module = FAMILIES[family]
    hf_config = module.config_to_hf(config)
    hf_state_dict, unmatched = rename_weights(state_dict, invert(module.WEIGHT_MAP))
    if unmatched:
        raise ValueError(f"weights with no {family} name: {unmatched}")
    hf_state_dict = module.to_hf_layout(hf_state_dict, config)
    hf_state_dict = {k: v.detach().contiguous().clone().cpu() for k, v in hf_state_dict.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokens = special_tokens or SpecialTokens()
    if tokenizer is not None:
        tokens = tokens.with_ids(save_tokenizer(tokenizer, path, tokens.ids))
    # Every id is written, None included: a missing one would take the family's default
    # (50256 for GPT-2, 2 for Llama), which names a token of another vocabulary.
    hf_config.update(tokens.ids)
    # the key transformers 5 writes and reads ("torch_dtype" before)
    hf_config["dtype"] = str(next(iter(hf_state_dict.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    # Plain JSON rather than transformers' GenerationConfig: the library does not need
    # transformers to save.
    generation = json.dumps(tokens.generation_json(), indent=2)
    (path / "generation_config.json").write_text(generation + "\n")
    save_file(hf_state_dict, str(path / "model.safetensors"), metadata={"format": "pt"})
