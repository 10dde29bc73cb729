"""Where the text comes from: the quickstart corpus, local files, or a hub dataset.

Every source becomes a Hugging Face ``datasets.DatasetDict`` with a ``train`` and a
``validation`` split and one string column (``text``), plus a fingerprint that changes when
the text does (it keys the token cache).
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

_SUFFIX_TO_BUILDER = {
    ".txt": "text", ".text": "text", ".md": "text", ".py": "text",
    ".json": "json", ".jsonl": "json", ".parquet": "parquet",
}  # fmt: skip
_COMPRESSIONS = (".zst", ".gz", ".bz2", ".xz")


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


def _offline_hint(name: str) -> str:
    cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets"
    )
    return (
        f"Could not load the dataset {name!r} from the Hugging Face hub (no network, or the "
        "name is wrong). Either\n"
        "  - point at local files: data.source.kind=files "
        "data.source.data_files='/data/owt/*.jsonl.zst' (text, jsonl, jsonl.zst, parquet; "
        "data.source.text_field=<column>), or\n"
        f'  - download it once on a machine with network (python -c "import datasets; '
        f"datasets.load_dataset('{name}')\"), copy the Hugging Face datasets cache folder "
        f"(HF_DATASETS_CACHE, here {cache}) to this machine and run with HF_DATASETS_OFFLINE=1."
    )


def load_text_dataset(source, cache_dir: str | os.PathLike, seed: int = 0):
    """Load a source config as (DatasetDict with train/validation, text column, fingerprint).

    Args:
        source: mapping with ``kind`` ("quickstart", "files", "hub") and its options:
            quickstart: max_bytes. files: data_files (path, glob or list), format (optional).
            hub: name, config_name, revision, split, val_split. All: text_field,
            val_fraction (held-out share of documents when there is no validation split),
            max_documents (cap, for quick runs).
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
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        loaded = datasets.load_dataset(
            builder, data_files=resolved, cache_dir=hf_cache or os.path.join(cache_dir, "hf"),
            **kwargs,
        )  # fmt: skip
        splits = dict(loaded)
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
        try:
            loaded = datasets.load_dataset(
                name, source.get("config_name"), revision=source.get("revision"),
                cache_dir=hf_cache, num_proc=source.get("download_num_proc"),
            )  # fmt: skip
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
            raise RuntimeError(_offline_hint(name) + f"\n(original error: {exc})") from exc
        except Exception as exc:  # datasets' own "not found" errors have no common base
            if type(exc).__name__ in (
                "DatasetNotFoundError",
                "HfHubHTTPError",
                "LocalEntryNotFoundError",
            ):
                raise RuntimeError(_offline_hint(name) + f"\n(original error: {exc})") from exc
            raise
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
        n_val = max(1, round(len(train) * val_fraction))
        if len(train) < 2:
            raise ValueError("need at least 2 documents to hold out a validation split")
        parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    keep = [text_field]
    train = train.select_columns(keep)
    validation = validation.select_columns(keep)
    fingerprint += f"|docs={max_docs}|val={val_split}:{source.get('val_fraction')}|seed={seed}"
    return datasets.DatasetDict({"train": train, "validation": validation}), text_field, fingerprint
