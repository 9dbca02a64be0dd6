"""A subset's tokens shared by every rank of its trainer (pure: Arrow in, Arrow out; no Ray, no I/O).

Each rank tokenises one contiguous share of the subset (`share_bounds`), writes it as one Arrow table
(`rows_to_table`), and every rank reads all shares back in rank order (`rows_from_tables`): the subset is
tokenised once in total, not once per rank, and a resumed or restarted trainer reads the tokens instead of
tokenising again. Before training, `shares_mismatch` checks that the shares read back are this world's: exactly
one per rank, each of its `share_bounds` size (so together exactly the subset's rows); shares left by a trainer of
another world size would otherwise train half the rows, or some twice. Token rows are held packed (one int32 array
and offsets), not as Python lists: at 150k rows of 512 tokens that is 0.3 GB instead of several GB per rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

ROWS_IN, NO_RESPONSE = b"rows_in", b"rows_no_response_tokens"
SHARE_FILE = re.compile(r"part-(?P<rank>\d{5})\.parquet")


@dataclass(frozen=True)
class PackedRows:
    """Token rows as one flat array: row i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # [total tokens] int32
    offsets: np.ndarray  # [rows + 1] int64

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> PackedRows:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def share_bounds(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [start, stop) of n rows; shares differ in size by at most one row."""
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size


def share_file(rank: int) -> str:
    """The file holding rank `rank`'s share, in the trainer's tokens folder."""
    return f"part-{rank:05d}.parquet"


def share_rank(file_name: str) -> int | None:
    """The rank whose share `file_name` holds, or None for any other file."""
    found = SHARE_FILE.fullmatch(file_name)
    return int(found["rank"]) if found else None


def rows_in_share(schema: pa.Schema) -> int:
    """The subset rows a share was tokenised from, from its schema's metadata (`rows_to_table`)."""
    return int(schema.metadata[ROWS_IN])


def shares_mismatch(rows_in: Mapping[int, int], n_rows: int, world_size: int) -> str | None:
    """Why the shares found (rank -> the rows it was tokenised from) are not this world's shares of n rows, or None
    when they are: one per rank 0..world_size-1, none beyond, each `share_bounds` rows."""
    ranks = set(rows_in)
    if ranks != set(range(world_size)):
        return f"shares of ranks {sorted(ranks)} found for a world of {world_size}"
    expected = [stop - start for start, stop in (share_bounds(n_rows, world_size, r) for r in range(world_size))]
    off = [r for r in range(world_size) if rows_in[r] != expected[r]]
    if off:
        return f"shares of {sum(rows_in.values())} rows for a subset of {n_rows} (ranks {off} off their share)"
    return None


def _large_lists(rows: Sequence, dtype) -> pa.Array:
    packed = rows if isinstance(rows, PackedRows) else PackedRows.from_lists(rows)
    return pa.LargeListArray.from_arrays(pa.array(packed.offsets), pa.array(packed.tokens.astype(dtype)))


def rows_to_table(input_ids: Sequence, loss_spans: Sequence, rows_in: int, dropped: int) -> pa.Table:
    """One share as a table (input_ids and each row's flat [start, stop) loss spans, large lists of int32), its row
    counts in the metadata."""
    table = pa.table(
        {"input_ids": _large_lists(input_ids, np.int32), "loss_spans": _large_lists(loss_spans, np.int32)}
    )
    return table.replace_schema_metadata({ROWS_IN: str(rows_in), NO_RESPONSE: str(dropped)})


def rows_from_tables(tables: Sequence[pa.Table]) -> tuple[PackedRows, np.ndarray, int, int]:
    """All shares, in order, back into (packed rows, each row's labelled positions, rows in, rows dropped)."""
    counts = [(int(t.schema.metadata[ROWS_IN]), int(t.schema.metadata[NO_RESPONSE])) for t in tables]
    tokens, lengths, labels_at = [], [], []
    for t in tables:
        ids = t.column("input_ids").combine_chunks()
        tokens.append(ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
        lengths.append(np.diff(ids.offsets.to_numpy()))
        labels_at += [np.asarray(s, dtype=np.int64) for s in t.column("loss_spans").to_pylist()]
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets_all = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    at = np.empty(len(labels_at), dtype=object)
    at[:] = labels_at
    return PackedRows(flat, offsets_all), at, sum(c[0] for c in counts), sum(c[1] for c in counts)
