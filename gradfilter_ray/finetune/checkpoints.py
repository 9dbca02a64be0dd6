"""Resumable DeepSpeed checkpoints written by the ranks themselves, straight into the trainer's storage.

Written only under `finetune.checkpoint` epoch or steps. A ZeRO checkpoint in bf16 is 12 bytes a parameter with
ZeRO-3 and 14 with ZeRO-2 (measured: benchmarks/results/checkpoint_bytes.json; 81 and 94 GB for 7B), split across
ranks: each rank writes only its own shard. On a local or shared-mount run directory every rank writes into the
checkpoint folder in place (nothing is staged on a node's disk and copied after); on an object store each rank
writes its own shard to a temporary folder and uploads those files itself, then deletes them, so a node holds at
most its own ranks' shards for the length of one upload and nothing passes through Ray's copy or the driver. Ray
Train is then told about the folder without copying it (`CheckpointUploadMode.NO_UPLOAD`): it resumes from it and
keeps only the latest.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gradfilter_ray.storage import Location

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"


def checkpoint_name(steps_done: int) -> str:
    return f"checkpoint_step_{steps_done:07d}"


@dataclass
class CheckpointWrites:
    """What a subset's checkpoints cost, carried across resumes in the state file and reported in its summary."""

    steps: list[int] = field(default_factory=list)  # optimiser steps done at each checkpoint
    bytes: int = 0  # all ranks' files, as they lie in storage
    staged_bytes: int = 0  # written to a node's local disk first (object stores only; 0 on a shared mount)
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.steps)

    def as_dict(self) -> dict:
        return {
            "checkpoints": self.count,
            "checkpoint_steps": self.steps,
            "checkpoint_bytes": self.bytes,
            "checkpoint_staged_bytes": self.staged_bytes,
            "checkpoint_seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointWrites:
        steps, size = list(d["checkpoint_steps"]), d["checkpoint_bytes"]
        return cls(steps, size, d["checkpoint_staged_bytes"], d["checkpoint_seconds"])


def folder_bytes(where: Location) -> int:
    import pyarrow.fs as pafs

    found = where.filesystem.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in found if i.type == pafs.FileType.File)


def save_shards(engine, where: Location) -> int:
    """This rank's part of the DeepSpeed checkpoint into `where`; returns the bytes it staged on local disk."""
    if where.is_local:
        engine.save_checkpoint(where.path, tag=DS_TAG, save_latest=False)
        return 0
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="gfr-ds-shard-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        staged = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        # copy_files merges into the folder (other ranks upload theirs beside it); it removes nothing
        pafs.copy_files(tmp, where.path, destination_filesystem=where.filesystem)
    return staged


def write_checkpoint(
    engine, where: Location, rank: int, steps_done: int, losses: list, writes: CheckpointWrites, device
) -> None:
    """Every rank writes its shard; once all have (the sum of their staged bytes is a collective), rank 0 records
    the folder's bytes and writes the trainer state (next step, the loss curve so far, the checkpoint writes
    including this one), last, so a folder without it is not a checkpoint."""
    from gradfilter_ray.finetune.loop import sum_across_workers

    started = time.perf_counter()
    staged_all = sum_across_workers(save_shards(engine, where), device)
    if rank == 0:
        writes.steps.append(steps_done)
        writes.bytes += folder_bytes(where)
        writes.staged_bytes += int(staged_all)
        writes.seconds += time.perf_counter() - started
        state = {"next_step": steps_done, "losses": losses, "written": writes.as_dict()}
        (where / STATE_FILE).write_text(json.dumps(state))


def read_state(saved: Path) -> tuple[int, list, CheckpointWrites]:
    state = json.loads((Path(saved) / STATE_FILE).read_text())
    return state["next_step"], state["losses"], CheckpointWrites.from_dict(state["written"])
