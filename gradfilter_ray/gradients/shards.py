"""Extraction's unit of commit: a shard is a fixed row range of one `tokens/` file, extracted and committed alone.

The plan cuts the rows into the fewest shards that is a multiple of the actor count with none over
`gradients.shard_rows`, all of nearly the same size: every actor gets the same number of shards and none waits out
another's second wave. Shards are kept as large as `shard_rows` allows because rows are sorted by length within a
shard only: smaller shards pad more (docs/scale.md, "Shards and progress").

A config's shards live in its own folder, ``gradients/<stage key>/``. A shard's rows land in its
``part-{index}.parquet`` (one whole-object write) and then its marker in ``_shards/part-{index}.json`` (the commit
key and the shard's row range): a shard is done only when its marker names this commit key and this range. The plan
itself is recorded in ``_shards/plan.json``: a re-run with the same key over the same `tokens/` files keeps that plan
even where the actor count changed (the width of a stage never redoes finished work), keeps its committed shards and
computes the rest; anything else in the folder (a part without a marker, a shard of another commit key, as after
the adapters were retrained, or of another layout, a stray file) is removed first. Pure: plans and names, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MARKERS = "_shards"
PLAN = f"{MARKERS}/plan.json"


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


def shard_count(total_rows: int, actors: int, max_rows: int) -> int:
    """The fewest shards that is a multiple of `actors` with none over `max_rows` (as many as the rows where there
    are fewer rows than that)."""
    if min(actors, max_rows) < 1:
        raise ValueError("actors and max_rows must be >= 1")
    least = -(-total_rows // max_rows)
    return min(total_rows, -(-least // actors) * actors)


def plan_shards(file_rows: list[tuple[str, int]], max_rows: int, actors: int = 1) -> list[Shard]:
    """Cut the files (in the given order) into about `shard_count` shards of nearly equal size; none spans files.

    Each file gets its share of the count by its rows (largest remainders, ties to the earlier file), raised to at
    least one shard and to enough that none exceeds `max_rows`; a file's shards differ by at most one row. The plan is
    a function of its arguments only."""
    total = sum(rows for _, rows in file_rows)
    count = shard_count(total, actors, max_rows)
    if count == 0:
        return []
    per_file = [count * rows // total for _, rows in file_rows]
    by_remainder = sorted(range(len(file_rows)), key=lambda f: (-(count * file_rows[f][1] % total), f))
    for f in by_remainder[: count - sum(per_file)]:
        per_file[f] += 1
    shards: list[Shard] = []
    for (file, rows), share in zip(file_rows, per_file):
        pieces = min(rows, max(share, 1, -(-rows // max_rows)))
        size, longer = divmod(rows, pieces) if pieces else (0, 0)
        first = 0
        for i in range(pieces):
            stop = first + size + (i < longer)
            shards.append(Shard(len(shards), file, first, stop))
            first = stop
    return shards


def plan_record(key: str, file_rows: list[tuple[str, int]], shards: list[Shard]) -> dict:
    """What PLAN holds: the plan, the stage key it was made for and the files it cuts."""
    return {"key": key, "files": [[file, rows] for file, rows in file_rows], "shards": [asdict(s) for s in shards]}


def recorded_plan(
    record: dict | None, key: str, file_rows: list[tuple[str, int]], max_rows: int
) -> list[Shard] | None:
    """The shards of a plan recorded for this key over these files (row counts included), when they tile the files
    exactly and none is over `max_rows`; else None (plan anew)."""
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if record.get("files") != [[file, rows] for file, rows in file_rows]:
        return None
    try:
        shards = [Shard(**spec) for spec in record["shards"]]
    except (KeyError, TypeError):
        return None
    if not _tiles(shards, file_rows) or any(s.rows > max_rows for s in shards):
        return None
    return shards


def _tiles(shards: list[Shard], file_rows: list[tuple[str, int]]) -> bool:
    """Whether `shards`, numbered 0.., cut each file in order into consecutive non-empty ranges covering all of it."""
    at = 0
    for file, rows in file_rows:
        first = 0
        while first < rows:
            if at == len(shards):
                return False
            s = shards[at]
            if (s.index, s.file, s.first_row) != (at, file, first) or not first < s.stop_row <= rows:
                return False
            first, at = s.stop_row, at + 1
    return at == len(shards)


def keep_and_clear(shards: list[Shard], markers: dict[str, dict], files: list[str], key: str):
    """(shards already committed for `key`, shards to compute, files of the config's folder to delete).

    `markers`: marker path -> its record; `files`: every file under the folder (relative paths). A marker whose
    part is gone (a lifecycle rule, a partial copy of the run) commits nothing. PLAN stays: the driver rewrites it."""
    present = set(files)
    done = [s for s in shards if s.part in present and s.committed_by(markers.get(s.marker), key)]
    keep = {PLAN} | {name for s in done for name in (s.part, s.marker)}
    done_ids = {s.index for s in done}
    return done, [s for s in shards if s.index not in done_ids], sorted(f for f in files if f not in keep)
