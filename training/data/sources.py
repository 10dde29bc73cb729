"""Where the text comes from: the quickstart corpus, local files, or a hub dataset.

Every source becomes a Hugging Face ``datasets.DatasetDict`` with a ``train`` and a
``validation`` split and one string column (``text``), plus a fingerprint that changes when
the text does (it keys the token cache).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from pathlib import Path

from training.data.file_checks import find_unreadable_file

_SUFFIX_TO_BUILDER = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".py": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".zst", ".gz", ".bz2", ".xz")

log = logging.getLogger(__name__)


def quickstart_files(max_bytes: int) -> list[Path]:
    """The standard library's own Python sources, in sorted order, up to max_bytes in total.

    They ship with every Python installation (the documentation does not), so the quickstart
    needs no download. ``site-packages`` is skipped: its content differs between machines.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise RuntimeError(f"no Python sources found under the standard library at {root}")
    return files


def _builder_for(path: str) -> str:
    name = path.lower()
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    suffix = os.path.splitext(name)[1]
    if suffix not in _SUFFIX_TO_BUILDER:
        raise ValueError(
            f"data.source.data_files: cannot tell the format of {path!r}; use .txt, .jsonl, "
            ".jsonl.zst, .json.gz or .parquet, or set data.source.format"
        )
    return _SUFFIX_TO_BUILDER[suffix]


def _expand(patterns) -> list[str]:
    import glob

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise FileNotFoundError(f"data.source.data_files: nothing matches {pattern!r}")
        files.extend(matched)
    return files


def files_builder_args(source) -> tuple[str, dict[str, list[str]], dict]:
    """(datasets builder, {split: files}, builder kwargs) of a data.source.kind=files config."""
    data_files = source.get("data_files")
    if not data_files:
        raise ValueError("data.source.data_files is required for data.source.kind=files")
    if isinstance(data_files, str) or not hasattr(data_files, "keys"):
        data_files = {"train": data_files}
    resolved = {split: _expand(patterns) for split, patterns in data_files.items()}
    builders = {_builder_for(f) for fs in resolved.values() for f in fs}
    builder = source.get("format") or (builders.pop() if len(builders) == 1 else None)
    if builder is None:
        raise ValueError(f"data.source.data_files mixes formats {sorted(builders)}")
    kwargs = {}
    if builder == "text":
        # Several text files hold one document each; a single one holds many, separated
        # by blank lines.
        single = all(len(files) == 1 for files in resolved.values())
        kwargs = {"sample_by": "paragraph" if single else "document"}
    return builder, resolved, kwargs


class HubUnreachable(RuntimeError):
    """A hub dataset could not be loaded (no network, or no such dataset); the message says
    how to train without the hub."""


def _offline_hint(name: str) -> str:
    cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets"
    )
    return (
        f"Could not load the dataset {name!r} from the Hugging Face hub (no network, or no "
        "such dataset). Either\n"
        "  - train on a local copy, keeping this data config's tokenizer and settings:\n"
        "      data.source.kind=files data.source.data_files='/data/corpus/*.jsonl.zst'\n"
        "    (.txt, .jsonl, .jsonl.zst, .parquet; data.source.text_field=<column> names the "
        "text), or\n"
        f'  - download it once on a machine with network (python -c "import datasets; '
        f"datasets.load_dataset('{name}')\"), copy the Hugging Face datasets cache folder "
        f"(HF_DATASETS_CACHE, here {cache}) to this machine and run with HF_DATASETS_OFFLINE=1."
    )


PARQUET_EXPORT = "refs/convert/parquet"


def _is_loading_script_error(exc: Exception) -> bool:
    return isinstance(exc, RuntimeError) and "Dataset scripts are no longer supported" in str(exc)


def _load_hub_once(path: str, **kwargs):
    """datasets.load_dataset of a hub dataset, with "cannot reach it" errors turned into the
    offline hint (a loading-script refusal is passed on as it is)."""
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        raise HubUnreachable(_offline_hint(path) + f"\n(original error: {exc})") from exc
    except Exception as exc:  # datasets' own "not found" errors have no common base
        if type(exc).__name__ in (
            "DatasetNotFoundError",
            "HfHubHTTPError",
            "LocalEntryNotFoundError",
        ):
            raise HubUnreachable(_offline_hint(path) + f"\n(original error: {exc})") from exc
        raise


def load_hub_dataset(source, **kwargs):
    """The hub dataset data.source names (DatasetDict, or IterableDatasetDict with
    ``streaming=True`` in kwargs).

    A dataset published with a loading script (which datasets 4 and later refuse) is loaded
    from the hub's parquet export instead (revision refs/convert/parquet, one folder per
    config).
    """
    name, config = source.get("name"), source.get("config_name")
    try:
        return _load_hub_once(name, name=config, revision=source.get("revision"), **kwargs)
    except RuntimeError as exc:
        if not _is_loading_script_error(exc):
            raise
        script_error = exc
    log.warning(
        "%s has a loading script (%s): loading its parquet export (revision %s)",
        name,
        script_error,
        PARQUET_EXPORT,
    )
    try:
        return _load_hub_once(name, data_dir=config, revision=PARQUET_EXPORT, **kwargs)
    except Exception as exc:
        raise HubUnreachable(
            f"Could not load the dataset {name!r}: (1) load_dataset refused its loading script "
            f"({script_error}); (2) its parquet export (revision={PARQUET_EXPORT!r}) failed too "
            f"({exc}). Use local files instead: data.source.kind=files "
            "data.source.data_files='/data/corpus/*.parquet' (or .jsonl, .jsonl.zst, .txt)."
        ) from exc


def _load_files(builder: str, resolved: dict, kwargs: dict, text_field: str, cache_dir: str):
    """datasets.load_dataset of local files; a file it cannot read, or training text that is
    empty, is a ValueError naming the file, what is wrong with it and what was expected."""
    import datasets

    files = [f for fs in resolved.values() for f in fs]
    try:
        loaded = datasets.load_dataset(builder, data_files=resolved, cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # DatasetGenerationError, StopIteration ... name no file
        raise_if_unreadable(files, builder, text_field, exc)
        raise
    if _holds_no_text(loaded.get("train"), text_field):
        raise_if_unreadable(files, builder, text_field)
    return loaded


def _holds_no_text(train, text_field: str) -> bool:
    """Whether a train split of at most one document has no text (a blank file)."""
    if train is None or len(train) > 1 or text_field not in train.column_names:
        return False
    return not any(str(text).strip() for text in train[text_field])


def raise_if_unreadable(
    files: list[str], builder: str, text_field: str, cause=None, read_through: bool = True
) -> None:
    """ValueError naming the first of files that cannot be read (see find_unreadable_file),
    raised from cause; nothing when each one reads."""
    problem = find_unreadable_file(files, builder, text_field, read_through)
    if problem is not None:
        raise ValueError(f"data.source.data_files: {problem}") from cause


def _split_single_document(dataset, text_field: str, val_fraction: float):
    """(train, validation) datasets of one document each: its last val_fraction of characters,
    cut at a line start where there is one, is held out."""
    import datasets

    if len(dataset) == 0 or not dataset[0][text_field].strip():
        raise ValueError("the training text is empty; check data.source.data_files")
    text = dataset[0][text_field]
    cut = int(len(text) * (1.0 - val_fraction))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    if not 0 < cut < len(text):
        raise ValueError(
            f"one document of {len(text)} characters cannot be split for validation with "
            f"data.source.val_fraction={val_fraction}; use more text or a larger val_fraction"
        )
    return tuple(
        datasets.Dataset.from_dict({text_field: [part]}) for part in (text[:cut], text[cut:])
    )


def load_text_dataset(source, cache_dir: str | os.PathLike, seed: int = 0):
    """Load a source config as (DatasetDict with train/validation, text column, fingerprint).

    Args:
        source: mapping with ``kind`` ("quickstart", "files", "hub") and its options:
            quickstart: max_bytes. files: data_files (path, glob or list; a single .txt file
            is split into documents at blank lines), format (optional). hub: name,
            config_name, revision, split, val_split. All: text_field, val_fraction (held-out
            share of documents when there is no validation split; of the text when there is
            one document), max_documents (cap, for quick runs).
        cache_dir: the shared cache folder (datasets' own cache for local files goes under it).
    """
    import datasets

    kind = source.get("kind")
    text_field = source.get("text_field") or "text"
    hf_cache = source.get("hf_cache_dir")
    val_split = source.get("val_split")
    if kind == "quickstart":
        files = quickstart_files(int(source.get("max_bytes") or 4_000_000))
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        ds = datasets.Dataset.from_dict({"text": texts})
        digest = hashlib.sha256()
        for f, t in zip(files, texts):
            digest.update(f"{f.name}|{len(t)}|".encode())
            digest.update(hashlib.sha256(t.encode()).digest())
        fingerprint = f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-" + digest.hexdigest()
        splits = {"train": ds}
        text_field = "text"
    elif kind == "files":
        builder, resolved, kwargs = files_builder_args(source)
        hf_cache = hf_cache or os.path.join(cache_dir, "hf")
        splits = dict(_load_files(builder, resolved, kwargs, text_field, hf_cache))
        stats = "|".join(
            f"{s}:{f}:{os.path.getsize(f)}:{os.path.getmtime(f)}"
            for s, fs in sorted(resolved.items())
            for f in fs
        )
        fingerprint = "files-" + hashlib.sha256(stats.encode()).hexdigest()
    elif kind == "hub":
        name = source.get("name")
        if not name:
            raise ValueError("data.source.name is required for data.source.kind=hub")
        loaded = load_hub_dataset(
            source, cache_dir=hf_cache, num_proc=source.get("download_num_proc")
        )
        splits = dict(loaded)
        train_split = source.get("split") or "train"
        if train_split not in splits:
            raise ValueError(f"dataset {name!r} has splits {list(splits)}, not {train_split!r}")
        splits["train"] = splits.pop(train_split)
        fingerprint = (
            "hub-"
            + hashlib.sha256(
                "|".join(f"{k}:{v._fingerprint}" for k, v in sorted(splits.items())).encode()
            ).hexdigest()
        )
    else:
        raise ValueError(f"data.source.kind must be 'quickstart', 'files' or 'hub', got {kind!r}")

    for split, ds in splits.items():
        if text_field not in ds.column_names:
            raise ValueError(
                f"split {split!r} has columns {ds.column_names}; set data.source.text_field"
            )
    train = splits["train"]
    max_docs = source.get("max_documents")
    if max_docs:
        train = train.select(range(min(int(max_docs), len(train))))
    if val_split and val_split in splits:
        validation = splits[val_split]
    else:
        val_fraction = float(source.get("val_fraction") or 0.0005)
        if len(train) < 2:
            train, validation = _split_single_document(train, text_field, val_fraction)
        else:
            n_val = max(1, round(len(train) * val_fraction))
            parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
            train, validation = parts["train"], parts["test"]
    keep = [text_field]
    train = train.select_columns(keep)
    validation = validation.select_columns(keep)
    fingerprint += f"|docs={max_docs}|val={val_split}:{source.get('val_fraction')}|seed={seed}"
    return datasets.DatasetDict({"train": train, "validation": validation}), text_field, fingerprint
