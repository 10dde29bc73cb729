"""FSDP (Lightning's strategy, one unit per block) on two CPU processes with gloo: training
on streamed, document-masked batches, a sharded checkpoint, and a resume that continues with
the uninterrupted run's losses."""

from __future__ import annotations

import pytest
import torch
from training_testing import (
    losses_by_step,
    run_train_py,
    step_checkpoint_overrides,
    two_cpu_process_args,
)

SHARDED = "{_target_:training.train.fsdp_strategy,state_dict_type:sharded}"
# streamed documents with document masking: each rank's stream position is in the checkpoint;
# last.ckpt at step 6, not after each step (a sharded save is the costliest part of a step
# here; the checkpoint resumed from is the one of step 3)
STREAMING = [
    "data.streaming=true",
    "data.val_documents=10",
    "data.document_mask=true",
    "callbacks.last_checkpoint.every_n_train_steps=6",
]


def _finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_fsdp_sharded_checkpoint_resumes_with_the_same_losses(tmp_path, cache_dir, corpus):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    args = [*two_cpu_process_args(corpus, cache_dir, full_dir, 6, SHARDED), *STREAMING]
    _finish(run_train_py([*args, *step_checkpoint_overrides(3)], cache_dir))
    at_step_3 = full_dir / "checkpoints" / "at-3.ckpt"
    assert at_step_3.is_dir()  # one shard per rank, and the metadata
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in at_step_3.iterdir()}
    meta = torch.load(at_step_3 / "meta.pt", weights_only=True)
    streams = meta["GPTDataModule"]["train_streams"]
    assert streams["world_size"] == 2 and [r["batches"] for r in streams["ranks"]] == [3, 3]
    # the full weights, gathered from both shards, end in the run's Hugging Face folder
    assert (full_dir / "hf" / "model.safetensors").is_file()
    args = [*two_cpu_process_args(corpus, cache_dir, resumed_dir, 6, SHARDED), *STREAMING]
    _finish(run_train_py([*args, f"ckpt_path={at_step_3}"], cache_dir))
    want, got = losses_by_step(full_dir), losses_by_step(resumed_dir)
    assert sorted(want) == list(range(1, 7)) and {4, 5, 6} <= set(got)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
