"""Exact-duplicate detection in bounded memory: keys spilled to local files by bucket, one bucket in memory at a time.

The finish of ingest streams the normalized rows twice in the same order. On the first pass `DuplicateFinder.add`
takes each batch's keys (position in the stream, id, content hash, eligibility): eligible rows go into one of
`buckets` files by their content hash, every id into one of `buckets` files by the id itself. `finish` then reads
one bucket at a time: rows sharing a hash all lie in one hash bucket, where the lowest id is kept and every other
row becomes a twin (its position, the kept id); a repeated id lies in one id bucket. Twins are spilled once more by
position range, so that the second pass (`TwinIndex.within`) holds the twins of one range only.

Memory is bounded by `rows_per_bucket` (the bucket count grows with the corpus instead), whatever the corpus size,
unless one text repeats more than that many times (all its rows share one bucket). The spill files are fixed-width
NumPy records on the task's local disk (~40 bytes a row): appending to them needs no open writer per bucket, and an
object store has no appends.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

ROWS_PER_BUCKET = 250_000  # keys of one bucket, deduplicated at once: ~30 MB with the sort's temporaries
ROWS_PER_RANGE = 1_000_000  # stream positions per twin file: its twins are held while the second pass crosses it

KEY = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("id", "<i8"), ("position", "<i8")])  # a content hash as 2 words
TWIN = np.dtype([("position", "<i8"), ("kept", "<i8")])
ID = np.dtype("<i8")
_ID_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: ids are strided (file * 2**40 + row), not uniform


class DuplicateIdError(AssertionError):
    """Two rows with one id: ingest's ids are positions, so this is a bug, never bad input."""


def hash_words(hashes: pa.Array) -> np.ndarray:
    """[N] binary(16) content hashes (no nulls) -> [N, 2] uint64: the same 16 bytes, compared as two words."""
    if hashes.null_count:
        raise ValueError("content hashes must not be null")
    if isinstance(hashes, pa.ChunkedArray):
        hashes = pa.concat_arrays(hashes.chunks) if hashes.num_chunks else pa.array([], pa.binary(16))
    if hashes.type != pa.binary(16):
        raise TypeError(f"content hashes must be binary(16), got {hashes.type}")
    data = np.frombuffer(hashes.buffers()[1], dtype=np.uint8)
    return data[hashes.offset * 16 : (hashes.offset + len(hashes)) * 16].view("<u8").reshape(-1, 2)


def hash_bucket(h0: np.ndarray, buckets: int) -> np.ndarray:
    return (h0 % np.uint64(buckets)).astype(np.int64)  # the hash is uniform already (BLAKE2b)


def id_bucket(ids: np.ndarray, buckets: int) -> np.ndarray:
    return ((ids.astype(np.uint64) * _ID_MIX >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)


def twins_of(keys: np.ndarray) -> np.ndarray:
    """KEY records -> TWIN records: every row whose hash a lower id shares, with that lowest id (the kept twin).
    Pure and whole-bucket: all rows of a hash must be in `keys`."""
    if len(keys) == 0:
        return np.empty(0, TWIN)
    order = np.lexsort((keys["id"], keys["h1"], keys["h0"]))
    h0, h1, ids = keys["h0"][order], keys["h1"][order], keys["id"][order]
    starts = np.ones(len(order), bool)
    starts[1:] = (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])
    first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))  # each row's group start
    twins = np.empty(int((~starts).sum()), TWIN)
    twins["position"] = keys["position"][order][~starts]
    twins["kept"] = ids[first][~starts]
    return twins


def repeated_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.sort(ids)
    return np.unique(ids[1:][ids[1:] == ids[:-1]])


class _Spill:
    """Fixed-width records appended to `count` local files by bucket number; read back one bucket at a time."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, count: int) -> None:
        self.folder, self.name, self.dtype, self.count = folder, name, dtype, count
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, bucket: int) -> Path:
        return self.folder / f"{self.name}-{bucket:06d}.bin"

    def append(self, bucket: np.ndarray, records: np.ndarray) -> None:
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.count + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            with open(self.path(b), "ab") as fh:
                fh.write(records[order[bounds[b] : bounds[b + 1]]].tobytes())

    def read(self, bucket: int) -> np.ndarray:
        path = self.path(bucket)
        return np.fromfile(path, dtype=self.dtype) if path.exists() else np.empty(0, self.dtype)

    def drop(self, bucket: int) -> None:
        self.path(bucket).unlink(missing_ok=True)


class TwinIndex:
    """The twins found by `DuplicateFinder`, looked up by stream position as the second pass goes along."""

    def __init__(self, spill: _Spill | None, rows_per_range: int) -> None:
        self.spill, self.rows_per_range = spill, rows_per_range
        self.range, self.positions, self.kept = -1, np.empty(0, np.int64), np.empty(0, np.int64)

    def _load(self, r: int) -> None:
        twins = np.sort(self.spill.read(r), order="position")
        self.spill.drop(r)  # each range is crossed once, in order
        self.range, self.positions, self.kept = r, twins["position"], twins["kept"]

    def within(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets from `start`, kept ids) of the twins among positions [start, stop), in position order."""
        if self.spill is None or stop <= start:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        offsets, kept = [], []
        for r in range(start // self.rows_per_range, (stop - 1) // self.rows_per_range + 1):
            if r != self.range:
                if r < self.range:  # its spill is gone: going back would silently find no twins
                    raise AssertionError(f"twin ranges must be read in order: range {r} after {self.range}")
                self._load(r)
            lo, hi = np.searchsorted(self.positions, [start, stop])
            offsets.append(self.positions[lo:hi] - start)
            kept.append(self.kept[lo:hi])
        return np.concatenate(offsets), np.concatenate(kept)


class DuplicateFinder:
    """First pass: `add` every batch's keys in stream order; `finish` checks ids and returns the `TwinIndex`."""

    def __init__(
        self,
        total_rows: int,
        folder: Path,
        dedup: bool = True,
        rows_per_bucket: int = ROWS_PER_BUCKET,
        rows_per_range: int = ROWS_PER_RANGE,
    ) -> None:
        # total_rows only sizes the buckets (any count is correct): a wrong guess costs memory, never rows
        self.buckets = max(1, math.ceil(total_rows / rows_per_bucket))
        self.folder, self.rows_per_range, self.dedup = folder, rows_per_range, dedup
        self.keys = _Spill(folder, "keys", KEY, self.buckets)
        self.ids = _Spill(folder, "ids", ID, self.buckets)
        self.rows = 0

    def add(self, ids: np.ndarray, hashes: pa.Array, eligible: np.ndarray) -> None:
        """The next rows of the stream: their ids, content hashes (null where rejected) and whether each may be a
        duplicate at all (rows rejected for another reason may not)."""
        positions = np.arange(self.rows, self.rows + len(ids), dtype=np.int64)
        self.rows += len(ids)
        ids = np.asarray(ids, dtype=np.int64)
        self.ids.append(id_bucket(ids, self.buckets), ids)
        if not self.dedup or not eligible.any():
            return
        words = hash_words(hashes.filter(pa.array(eligible)))
        keys = np.empty(len(words), KEY)
        keys["h0"], keys["h1"] = words[:, 0], words[:, 1]
        keys["id"], keys["position"] = ids[eligible], positions[eligible]
        self.keys.append(hash_bucket(keys["h0"], self.buckets), keys)

    def finish(self) -> TwinIndex:
        for b in range(self.buckets):
            repeated = repeated_ids(self.ids.read(b))
            self.ids.drop(b)
            if len(repeated):
                raise DuplicateIdError(f"ingest produced duplicate row ids (e.g. {repeated[:5].tolist()}): a bug")
        if not self.dedup:
            return TwinIndex(None, self.rows_per_range)
        ranges = _Spill(self.folder, "twins", TWIN, max(1, math.ceil(self.rows / self.rows_per_range)))
        for b in range(self.buckets):
            twins = twins_of(self.keys.read(b))
            self.keys.drop(b)
            ranges.append(twins["position"] // self.rows_per_range, twins)
        return TwinIndex(ranges, self.rows_per_range)
