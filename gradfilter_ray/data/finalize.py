"""Columnar finish of ingest: exact-duplicate detection and the kept / rejected split.

Runs over the normalized Parquet that the Ray Data pass wrote. Only (id, content_hash, reason) are held in memory
(~40 bytes a row); the text columns stream through in record batches, so memory stays flat in corpus size.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from gradfilter_ray.data.formats import CANONICAL_COLUMNS, DUPLICATE, NORMALIZED_SCHEMA, REJECT_COLUMNS
from gradfilter_ray.storage import Location

ROWS_PER_OUTPUT_FILE = 200_000


def duplicate_twins(ids: np.ndarray, hashes: pa.Array, eligible: np.ndarray) -> dict[int, int]:
    """{duplicate id: id of the kept twin} among eligible rows; the lowest id of each content hash is kept."""
    table = pa.table({"id": ids[eligible], "h": hashes.filter(pa.array(eligible))})
    firsts = table.group_by("h").aggregate([("id", "min"), ("id", "count")])
    firsts = firsts.filter(pc.greater(firsts["id_count"], 1))
    if firsts.num_rows == 0:
        return {}
    joined = table.join(firsts.select(["h", "id_min"]), keys="h", join_type="inner")
    dup = pc.not_equal(joined["id"], joined["id_min"])
    joined = joined.filter(dup)
    return dict(zip(joined["id"].to_pylist(), joined["id_min"].to_pylist()))


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


def split_kept_rejected(normalized: Location, data_out: Location, rejects_out: Location, dedup: bool) -> dict:
    """Write canonical rows to `data_out/` and every rejected row to `rejects_out`; return the counts."""
    dataset = pads.dataset(
        normalized.path, format="parquet", schema=NORMALIZED_SCHEMA, filesystem=normalized.filesystem
    )
    keys = dataset.to_table(columns=["id", "content_hash", "reason"])
    ids = keys["id"].to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise AssertionError("ingest produced duplicate row ids: this is a bug")
    twins = {}
    if dedup:
        eligible = keys["reason"].is_null().to_numpy(zero_copy_only=False)
        twins = duplicate_twins(ids, keys["content_hash"].combine_chunks(), eligible)
    del keys

    kept_schema = pa.schema([NORMALIZED_SCHEMA.field(c) for c in CANONICAL_COLUMNS])
    reject_schema = pa.schema([NORMALIZED_SCHEMA.field(c) for c in REJECT_COLUMNS])
    kept_writer = _RollingWriter(data_out, kept_schema, ROWS_PER_OUTPUT_FILE)
    rejects_out.parent().make_dir()
    reject_writer = pq.ParquetWriter(rejects_out.path, reject_schema, filesystem=rejects_out.filesystem)
    reasons: Counter[str] = Counter()
    rows_in = rows_kept = 0
    twin_ids = pa.array(list(twins), pa.int64())
    try:
        for batch in dataset.to_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            rows_in += table.num_rows
            is_dup = pc.is_in(table["id"], value_set=twin_ids) if twins else pa.repeat(False, table.num_rows)
            ok = pc.and_(table["reason"].is_null(), pc.invert(is_dup))
            kept = table.filter(ok).select(CANONICAL_COLUMNS)
            kept_writer.write(kept)
            rows_kept += kept.num_rows

            rejected = table.filter(pc.invert(ok))
            if rejected.num_rows:
                dup_mask = pc.is_in(rejected["id"], value_set=twin_ids) if twins else None
                if dup_mask is not None and pc.any(dup_mask).as_py():
                    reason = pc.if_else(dup_mask, pa.scalar(DUPLICATE), rejected["reason"])
                    detail = pa.array(
                        [
                            f"duplicate of id {twins[i]}" if d else old
                            for i, d, old in zip(
                                rejected["id"].to_pylist(), dup_mask.to_pylist(), rejected["detail"].to_pylist()
                            )
                        ],
                        pa.string(),
                    )
                    rejected = rejected.set_column(rejected.schema.get_field_index("reason"), "reason", reason)
                    rejected = rejected.set_column(rejected.schema.get_field_index("detail"), "detail", detail)
                reasons.update(rejected["reason"].to_pylist())
                reject_writer.write_table(rejected.select(REJECT_COLUMNS).cast(reject_schema))
    finally:
        kept_writer.close()
        reject_writer.close()
    if kept_writer.files == 0:  # an empty but valid dataset folder, so later stages see zero rows, not an error
        empty = data_out / "part-00000.parquet"
        pq.write_table(kept_schema.empty_table(), empty.path, filesystem=empty.filesystem)
    rows_rejected = sum(reasons.values())
    if rows_in != rows_kept + rows_rejected:
        raise AssertionError(f"row accounting broken: {rows_in} in != {rows_kept} kept + {rows_rejected} rejected")
    return {
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_rejected": rows_rejected,
        "rejects_by_reason": dict(sorted(reasons.items())),
    }
