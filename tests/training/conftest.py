"""Fixtures of the training tests (helpers are in training_testing.py)."""

from pathlib import Path

import pytest
from training_testing import make_documents, write_corpus


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the session: token arrays are built once and reused."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A jsonl corpus of 60 documents (about 40 KB) for training runs."""
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder, make_documents(60), "jsonl")[0]
