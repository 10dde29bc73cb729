"""cpu_threads=auto uses the cores the process may run on, whatever else the machine runs, and
the run's summary prints the count."""

from __future__ import annotations

import os

import pytest
from training_testing import compose_config, tiny_overrides

from training.train import cpu_threads, train


@pytest.fixture
def four_cores_under_load(monkeypatch):
    """An affinity of 4 cores on a machine whose 1-minute load average is 3.6."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.6, 2.0, 1.0))


def test_auto_takes_the_affinity_not_the_load(four_cores_under_load):
    assert cpu_threads("auto", "cpu", 1) == 4
    assert cpu_threads("auto", "cpu", 2) == 2  # shared among the processes of a CPU DDP run
    assert cpu_threads(3, "cpu", 1) == 3 and cpu_threads(None, "cpu", 1) is None
    assert cpu_threads("auto", "gpu", 1) is None


def test_auto_without_sched_getaffinity_counts_the_cpus(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert cpu_threads("auto", "cpu", 1) == 3


def test_summary_prints_the_thread_count(corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(compose_config([*tiny_overrides(corpus, cache_dir, run), "cpu_threads=1"]))
    assert summary["cpu_threads"] == 1
    assert "\ncpu threads       1\n" in (run / "summary.txt").read_text()
