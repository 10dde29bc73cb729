"""Why a local data file cannot be read, in words that name the file and what was expected.

``datasets.load_dataset`` reports a file it cannot parse as a ``DatasetGenerationError``
without the file's name; :func:`find_unreadable_file` reads the files again (decompressed,
stopping at the first problem) to say which one is wrong and how. A stream reads its files as
training goes: it checks them before it starts without reading them through, and again,
read through, when reading fails.
"""

from __future__ import annotations

import codecs
import io
import json
import re

_CHUNK = 1 << 20
_JSON_DOCUMENT = re.compile(r"\.json(\.(gz|zst|bz2|xz))?$", re.IGNORECASE)

EXPECTED = {
    "text": "UTF-8 text (one document per file, or documents separated by blank lines in a "
    "single file)",
    "json": "JSON lines: one JSON object per line, with a string field {text_field!r}",
    "parquet": "a parquet file with a string column {text_field!r}",
}


def _open(path: str):
    """A binary file object of path's content, decompressed by its suffix (.gz, .zst ...)."""
    import fsspec

    return fsspec.open(path, "rb", compression="infer").open()


def _open_problem(path: str) -> str | None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a folder, not a file"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return None


def _text_problem(path: str) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with _open(path) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as err:
                return f"is not UTF-8 text (an invalid byte near offset {offset + err.start})"
            offset += len(chunk)
    return None if has_text else "is empty" if offset == 0 else "holds only whitespace"


def _is_one_json_document(path: str) -> bool:
    """Whether a .json file (not JSON lines) parses as one document, e.g. an array of records."""
    if not _JSON_DOCUMENT.search(path):
        return False
    with _open(path) as f:
        try:
            json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return True


def _json_problem(path: str) -> str | None:
    if _is_one_json_document(path):
        return None
    with _open(path) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8")
        seen = False
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                seen = True
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number} is not JSON ({err.msg} at column {err.colno})"
                if not isinstance(record, dict):
                    return f"line {number} holds a JSON {type(record).__name__}, not an object"
        except UnicodeDecodeError:
            return "is not UTF-8 text"
    return None if seen else "is empty"


def _parquet_problem(path: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError ... for a bad file
        return f"is not a parquet file ({err})"
    return None


_PROBLEM = {"text": _text_problem, "json": _json_problem, "parquet": _parquet_problem}


def find_unreadable_file(
    files: list[str], builder: str, text_field: str, read_through: bool = True
) -> str | None:
    """The first of files (all read by the datasets builder "text", "json" or "parquet")
    that cannot be read, as "<file> <what is wrong>; expected <format>"; None when each one
    reads.

    read_through=False checks only what shows without reading a file through (for a stream,
    which reads its files as training goes): a file missing, a folder or unreadable, a parquet
    file without a parquet footer.
    """
    problem_of = _PROBLEM.get(builder)
    if problem_of is None:
        return None
    expected = EXPECTED[builder].format(text_field=text_field)
    for path in files:
        problem = _open_problem(path)
        if problem is None and (read_through or builder == "parquet"):
            problem = problem_of(path)  # a parquet file's problem shows in its footer
        if problem is not None:
            return f"{path} {problem}; expected {expected}"
    return None
