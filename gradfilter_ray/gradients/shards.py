"""Extraction's unit of commit: a shard is a fixed row range of one `tokens/` file, extracted and committed alone.

A shard's rows land in ``gradients/part-{index}.parquet`` (one whole-object write) and then its marker in
``gradients/_shards/part-{index}.json`` (the stage key and the shard's row range): a shard is done only when its
marker names this stage key and this range. A re-run with the same key keeps those shards and computes the rest;
anything else in `gradients/` (a part without a marker, a shard of another key or layout, a stray file) is removed
first. Pure: plans and names, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MARKERS = "_shards"


@dataclass(frozen=True)
class Shard:
    index: int
    file: str  # relative to tokens/
    first_row: int  # rows [first_row, stop_row) of that file
    stop_row: int

    @property
    def rows(self) -> int:
        return self.stop_row - self.first_row

    @property
    def part(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def marker(self) -> str:
        return f"{MARKERS}/part-{self.index:05d}.json"

    def marker_record(self, key: str, **facts) -> dict:
        return {"key": key, **asdict(self), **facts}

    def committed_by(self, record: dict | None, key: str) -> bool:
        """Whether `record` (a marker's content) commits exactly this shard for this stage key."""
        return (
            record is not None
            and record.get("key") == key
            and {k: record.get(k) for k in asdict(self)} == asdict(self)
        )


def plan_shards(file_rows: list[tuple[str, int]], shard_rows: int) -> list[Shard]:
    """Cut each file (in the given order) into consecutive shards of at most `shard_rows` rows; a file's last shard
    holds the remainder. The plan is a function of the files' row counts and `shard_rows` only."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    shards: list[Shard] = []
    for file, rows in file_rows:
        for first in range(0, rows, shard_rows):
            shards.append(Shard(len(shards), file, first, min(first + shard_rows, rows)))
    return shards


def keep_and_clear(shards: list[Shard], markers: dict[str, dict], files: list[str], key: str):
    """(shards already committed for `key`, shards to compute, files of `gradients/` to delete).

    `markers`: marker path -> its record; `files`: every file under `gradients/` (relative paths). A marker whose
    part is gone (a lifecycle rule, a partial copy of the run) commits nothing."""
    present = set(files)
    done = [s for s in shards if s.part in present and s.committed_by(markers.get(s.marker), key)]
    keep = {name for s in done for name in (s.part, s.marker)}
    done_ids = {s.index for s in done}
    return done, [s for s in shards if s.index not in done_ids], sorted(f for f in files if f not in keep)
