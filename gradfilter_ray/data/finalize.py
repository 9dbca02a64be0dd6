"""Columnar finish of ingest: exact-duplicate detection and the kept / rejected split, in memory flat in corpus size.

Runs (one Ray task) over the normalized Parquet that the Ray Data pass wrote, in two passes over the same files in the
same order, each one bounded record batch at a time (`parquet_stream`, no read-ahead). The first hands every row's
(id, content hash, reason) to `dedup.DuplicateFinder`, which finds the duplicates one hash bucket at a time through
spill files on the task's local disk. The second writes the kept rows to `data/` and every rejected row to
`rejects.parquet`, a duplicate with "duplicate of id N" naming its kept twin (the lowest id with its content).
No Python object is made per row.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradfilter_ray.data.dedup import DuplicateFinder, TwinIndex
from gradfilter_ray.data.formats import CANONICAL_COLUMNS, DUPLICATE, NORMALIZED_SCHEMA, REJECT_COLUMNS
from gradfilter_ray.parquet_stream import row_counts, stream_batches
from gradfilter_ray.storage import Location

ROWS_PER_OUTPUT_FILE = 200_000
KEY_COLUMNS = ["id", "content_hash", "reason"]
KEY_BATCH_ROWS = 65_536  # three narrow columns (~2 MB a batch); big batches keep the spill appends few
ROW_BATCH_ROWS = 8_192
KEPT_SCHEMA = pa.schema([NORMALIZED_SCHEMA.field(c) for c in CANONICAL_COLUMNS])
REJECT_SCHEMA = pa.schema([NORMALIZED_SCHEMA.field(c) for c in REJECT_COLUMNS])


class _RollingWriter:
    def __init__(self, folder: Location, schema: pa.Schema, rows_per_file: int) -> None:
        self.folder, self.schema, self.rows_per_file = folder, schema, rows_per_file
        self.folder.make_dir()
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.files = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.writer is None or self.rows_in_file >= self.rows_per_file:
            self.close()
            part = self.folder / f"part-{self.files:05d}.parquet"
            self.writer = pq.ParquetWriter(part.path, self.schema, filesystem=part.filesystem)
            self.files += 1
            self.rows_in_file = 0
        self.writer.write_table(table.cast(self.schema))
        self.rows_in_file += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def normalized_files(normalized: Location) -> list[Location]:
    """The Parquet files of the normalized folder, sorted: both passes must see the rows in one order."""
    return [normalized / rel for rel in normalized.files() if rel.endswith(".parquet")]


def stream(files: list[Location], columns: list[str] | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    for file in files:
        yield from stream_batches(file, columns, batch_rows)


def find_twins(files: list[Location], spill: Path, dedup: bool) -> tuple[TwinIndex, int]:
    """First pass: (the twins by stream position, rows seen); raises if two rows share an id."""
    finder = DuplicateFinder(sum(row_counts(files)), spill, dedup)
    for batch in stream(files, KEY_COLUMNS, KEY_BATCH_ROWS):
        eligible = batch.column("reason").is_null().to_numpy(zero_copy_only=False)
        finder.add(batch.column("id").to_numpy(), batch.column("content_hash"), eligible)
    return finder.finish(), finder.rows


def mark_duplicates(rejected: pa.Table, is_dup: np.ndarray, kept: np.ndarray) -> pa.Table:
    """Set reason "duplicate" and detail "duplicate of id N" on the rows flagged in `is_dup` (N from `kept`)."""
    flag = pa.array(is_dup)
    detail = pc.binary_join_element_wise("duplicate of id ", pc.cast(pa.array(kept), pa.string()), "")
    reason = pc.if_else(flag, pa.scalar(DUPLICATE), rejected["reason"])
    detail = pc.if_else(flag, detail, rejected["detail"])
    rejected = rejected.set_column(rejected.schema.get_field_index("reason"), "reason", reason)
    return rejected.set_column(rejected.schema.get_field_index("detail"), "detail", detail)


def split_kept_rejected(normalized: Location, data_out: Location, rejects_out: Location, dedup: bool) -> dict:
    """Write canonical rows to `data_out/` and every rejected row to `rejects_out`; return the counts."""
    files = normalized_files(normalized)
    with tempfile.TemporaryDirectory(prefix="gfr-dedup-") as spill:
        twins, rows_seen = find_twins(files, Path(spill), dedup)
        counts = write_split(stream(files, None, ROW_BATCH_ROWS), twins, data_out, rejects_out)
    if counts["rows_in"] != rows_seen:
        raise AssertionError(f"the two passes over the normalized rows saw {rows_seen} and {counts['rows_in']} rows")
    return counts


def write_split(batches: Iterator[pa.RecordBatch], twins: TwinIndex, data_out: Location, rejects_out: Location):
    """Second pass: kept rows to `data_out/` (files of ROWS_PER_OUTPUT_FILE), rejected ones to `rejects_out`."""
    kept_writer = _RollingWriter(data_out, KEPT_SCHEMA, ROWS_PER_OUTPUT_FILE)
    rejects_out.parent().make_dir()
    reject_writer = pq.ParquetWriter(rejects_out.path, REJECT_SCHEMA, filesystem=rejects_out.filesystem)
    reasons: Counter[str] = Counter()
    rows_in = rows_kept = 0
    try:
        for batch in batches:
            table = pa.Table.from_batches([batch])
            n = table.num_rows
            offsets, kept_ids = twins.within(rows_in, rows_in + n)
            rows_in += n
            is_dup = np.zeros(n, bool)
            is_dup[offsets] = True
            ok = batch.column("reason").is_null().to_numpy(zero_copy_only=False) & ~is_dup
            kept = table.filter(pa.array(ok)).select(CANONICAL_COLUMNS)
            kept_writer.write(kept)
            rows_kept += kept.num_rows

            rejected = table.filter(pa.array(~ok))
            if rejected.num_rows:
                if len(offsets):
                    kept_of = np.zeros(n, np.int64)
                    kept_of[offsets] = kept_ids
                    rejected = mark_duplicates(rejected, is_dup[~ok], kept_of[~ok])
                for item in pc.value_counts(rejected["reason"]).to_pylist():  # one item per reason, not per row
                    reasons[item["values"]] += item["counts"]
                reject_writer.write_table(rejected.select(REJECT_COLUMNS).cast(REJECT_SCHEMA))
    finally:
        kept_writer.close()
        reject_writer.close()
    if kept_writer.files == 0:  # an empty but valid dataset folder, so later stages see zero rows, not an error
        empty = data_out / "part-00000.parquet"
        pq.write_table(KEPT_SCHEMA.empty_table(), empty.path, filesystem=empty.filesystem)
    rows_rejected = sum(reasons.values())
    if rows_in != rows_kept + rows_rejected:
        raise AssertionError(f"row accounting broken: {rows_in} in != {rows_kept} kept + {rows_rejected} rejected")
    return {
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_rejected": rows_rejected,
        "rejects_by_reason": dict(sorted(reasons.items())),
    }
