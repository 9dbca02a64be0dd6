"""Bounded-memory dedup (data/dedup.py) and ingest's finish (data/finalize.py), without Ray: the bucketed search equals
a plain in-memory one for any bucket and range count, and the finish writes what the one-table version wrote."""

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.data import finalize
from gradfilter_ray.data.dedup import (
    KEY,
    DuplicateFinder,
    DuplicateIdError,
    hash_words,
    twins_of,
)
from gradfilter_ray.data.formats import RAW_SCHEMA, ROW_ID_FILE_STRIDE, normalize_batch
from gradfilter_ray.storage import open_location


def reference_twins(ids, hashes, eligible) -> dict[int, int]:
    """{stream position: kept id} the obvious way: the lowest id of each hash among eligible rows is kept."""
    lowest: dict[bytes, int] = {}
    for i, h, ok in zip(ids, hashes, eligible):
        if ok:
            lowest[h] = min(lowest.get(h, i), i)
    return {pos: lowest[h] for pos, (i, h, ok) in enumerate(zip(ids, hashes, eligible)) if ok and lowest[h] != i}


def random_keys(rng, rows: int, distinct: int):
    """ids (unique, strided like ingest's, shuffled), hashes from a small pool (many duplicates; some pairs share
    their first 8 bytes, so only the full 16 tell them apart) and an eligibility mask (~1/4 rejected)."""
    pool = [rng.bytes(16) for _ in range(distinct)]
    pool += [p[:8] + rng.bytes(8) for p in pool[:10]]  # same first word, another hash
    files = rng.integers(0, 4, rows)
    ids = files * ROW_ID_FILE_STRIDE + rng.permutation(rows * 3)[:rows]
    hashes = [pool[k] for k in rng.integers(0, len(pool), rows)]
    eligible = rng.random(rows) > 0.25
    return ids.astype(np.int64), hashes, eligible


def cut(rows: int, rng) -> list[tuple[int, int]]:
    bounds = np.unique(np.r_[0, rng.integers(0, rows, rng.integers(1, 12)), rows])
    return list(zip(bounds[:-1], bounds[1:]))


def run_finder(ids, hashes, eligible, tmp_path, rng, **sizes) -> dict[int, int]:
    finder = DuplicateFinder(len(ids), tmp_path, **sizes)
    for a, b in cut(len(ids), rng):
        # rejected rows carry no hash in ingest; here some do, and must still be left out
        column = pa.array([h if ok or k % 2 else None for k, (h, ok) in enumerate(zip(hashes[a:b], eligible[a:b]))])
        finder.add(ids[a:b], column.cast(pa.binary(16)), eligible[a:b])
    index = finder.finish()
    found = {}
    for a, b in cut(len(ids), rng):  # the second pass reads in other batches than the first
        offsets, kept = index.within(a, b)
        assert np.all(np.diff(offsets) > 0) and np.all((offsets >= 0) & (offsets < b - a))
        found.update({a + int(o): int(k) for o, k in zip(offsets, kept)})
    return found


@pytest.mark.parametrize("rows_per_bucket, rows_per_range", [(10**9, 10**9), (400, 64), (37, 1000), (1, 1), (5, 7)])
def test_bucketed_search_equals_in_memory_reference(tmp_path, rows_per_bucket, rows_per_range):
    rng = np.random.default_rng(rows_per_bucket * 31 + rows_per_range)
    ids, hashes, eligible = random_keys(rng, rows=2000, distinct=150)
    found = run_finder(
        ids, hashes, eligible, tmp_path, rng, rows_per_bucket=rows_per_bucket, rows_per_range=rows_per_range
    )
    expected = reference_twins(ids, hashes, eligible)
    assert len(expected) > 500  # many duplicates, most hashes repeated several times
    assert found == expected
    assert list(tmp_path.iterdir()) == []  # each spill file is removed once read: the disk is given back as it goes


def test_no_twins_when_every_hash_is_distinct_or_rejected(tmp_path):
    rng = np.random.default_rng(1)
    ids, _, eligible = random_keys(rng, rows=300, distinct=5)
    hashes = [rng.bytes(16) for _ in ids]
    assert run_finder(ids, hashes, eligible, tmp_path / "a", rng, rows_per_bucket=50) == {}
    same = [hashes[0]] * len(ids)
    none_eligible = np.zeros(len(ids), bool)
    assert run_finder(ids, same, none_eligible, tmp_path / "b", rng, rows_per_bucket=50) == {}


def test_twins_of_keeps_the_lowest_id_whatever_the_order():
    h = np.array([[1, 2], [1, 2], [1, 3], [1, 2], [9, 9]], dtype=np.uint64)
    keys = np.empty(5, KEY)
    keys["h0"], keys["h1"] = h[:, 0], h[:, 1]
    keys["id"] = [50, 7, 3, 20, 1]
    keys["position"] = [0, 1, 2, 3, 4]
    twins = twins_of(keys)
    assert sorted(zip(twins["position"].tolist(), twins["kept"].tolist())) == [(0, 7), (3, 7)]
    assert len(twins_of(np.empty(0, KEY))) == 0


@pytest.mark.parametrize("rows_per_bucket", [10**9, 3, 1])
def test_a_repeated_id_is_a_bug_even_among_rejected_rows(tmp_path, rows_per_bucket):
    finder = DuplicateFinder(6, tmp_path, rows_per_bucket=rows_per_bucket)
    hashes = pa.array([b"a" * 16, None, b"b" * 16], pa.binary(16))
    finder.add(np.array([1, 2, 3]), hashes, np.array([True, False, True]))
    finder.add(np.array([4, 2, 5]), hashes, np.array([True, False, True]))
    with pytest.raises(DuplicateIdError, match="duplicate row ids"):
        finder.finish()


def test_without_dedup_ids_are_still_checked_and_no_row_is_a_twin(tmp_path):
    same = pa.array([b"x" * 16] * 3, pa.binary(16))
    finder = DuplicateFinder(3, tmp_path / "a", dedup=False)
    finder.add(np.array([1, 2, 3]), same, np.ones(3, bool))
    offsets, kept = finder.finish().within(0, 3)
    assert len(offsets) == len(kept) == 0
    finder = DuplicateFinder(3, tmp_path / "b", dedup=False)
    finder.add(np.array([1, 2, 1]), same, np.ones(3, bool))
    with pytest.raises(DuplicateIdError):
        finder.finish()


def test_hash_words_reads_sliced_arrays_and_refuses_nulls():
    raw = [bytes(range(i, i + 16)) for i in range(5)]
    words = hash_words(pa.array(raw, pa.binary(16)).slice(2, 2))
    assert words.tobytes() == raw[2] + raw[3]
    assert hash_words(pa.chunked_array([pa.array(raw[:2], pa.binary(16))])).shape == (2, 2)
    with pytest.raises(ValueError):
        hash_words(pa.array([raw[0], None], pa.binary(16)))


# ----- the finish: normalized Parquet -> data/ + rejects.parquet --------------------------------------------------


def record(k: int) -> dict:
    return {"instruction": f"Task {k % 7}", "input": "" if k % 3 else "ctx", "output": f"Answer {k % 5}"}


def normalized_folder(folder, rng, files: int = 3, rows: int = 120):
    """Normalized Parquet as the Ray Data pass writes it (several files and row groups): ~35 distinct contents, so
    many duplicates within and across files, and bad rows, identical to each other, that are no duplicates."""
    folder.mkdir(parents=True)
    for f in range(files):
        raws = []
        for _ in range(rows):
            k = int(rng.integers(0, 200))
            if k % 9 == 0:
                raws.append(b'{"instruction": "no output"}')
            else:
                raws.append(json.dumps({**record(k), "n": int(rng.integers(0, 3))}).encode())
        order = rng.permutation(rows)  # a file's rows are not in id order
        raw = pa.Table.from_pydict(
            {
                "id": [int(f * ROW_ID_FILE_STRIDE + p) for p in order],
                "source_file": [f"f{f}.jsonl"] * rows,
                "source_row": [int(p) for p in order],
                "raw": [raws[p] for p in order],
            },
            schema=RAW_SCHEMA,
        )
        pq.write_table(normalize_batch(raw, max_chars=1000), folder / f"part-{f}.parquet", row_group_size=50)


def expected_split(normalized_table: pa.Table, dedup: bool):
    """The kept ids (in stream order) and {rejected id: (reason, detail)}, computed row by row in Python."""
    rows = normalized_table.to_pylist()
    lowest: dict[bytes, int] = {}
    for r in rows:
        if r["reason"] is None:
            lowest[r["content_hash"]] = min(lowest.get(r["content_hash"], r["id"]), r["id"])
    kept, rejected = [], {}
    for r in rows:
        if r["reason"] is not None:
            rejected[r["id"]] = (r["reason"], r["detail"])
        elif dedup and lowest[r["content_hash"]] != r["id"]:
            rejected[r["id"]] = ("duplicate", f"duplicate of id {lowest[r['content_hash']]}")
        else:
            kept.append(r["id"])
    return kept, rejected


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("rows_per_bucket, rows_per_range", [(10**9, 10**9), (16, 40), (1, 3)])
def test_split_writes_kept_and_rejected_rows_as_expected(
    tmp_path, monkeypatch, dedup, rows_per_bucket, rows_per_range
):
    rng = np.random.default_rng(7)
    normalized_folder(tmp_path / "normalized", rng)
    small = functools.partial(DuplicateFinder, rows_per_bucket=rows_per_bucket, rows_per_range=rows_per_range)
    monkeypatch.setattr(finalize, "DuplicateFinder", small)
    monkeypatch.setattr(finalize, "ROW_BATCH_ROWS", 33)  # batches straddle row groups, files and twin ranges
    monkeypatch.setattr(finalize, "KEY_BATCH_ROWS", 29)
    root = open_location(str(tmp_path))
    counts = finalize.split_kept_rejected(root / "normalized", root / "data", root / "rejects.parquet", dedup)

    stream = pq.read_table(sorted((tmp_path / "normalized").glob("*.parquet")))  # the finish's order
    kept_ids, rejected = expected_split(stream, dedup)
    data = pq.read_table(tmp_path / "data")
    rejects = pq.read_table(tmp_path / "rejects.parquet")
    assert data["id"].to_pylist() == kept_ids  # stream order, as before
    by_id = {r["id"]: r for r in stream.to_pylist()}
    assert data.to_pylist() == [{c: by_id[i][c] for c in data.column_names} for i in kept_ids]
    assert {r["id"]: (r["reason"], r["detail"]) for r in rejects.to_pylist()} == rejected
    assert all(r["raw_preview"] == by_id[r["id"]]["raw_preview"] for r in rejects.to_pylist())
    reasons = pc.value_counts(rejects["reason"]).to_pylist()
    assert counts == {
        "rows_in": stream.num_rows,
        "rows_kept": len(kept_ids),
        "rows_rejected": len(rejected),
        "rejects_by_reason": {item["values"]: item["counts"] for item in sorted(reasons, key=lambda i: i["values"])},
    }
    assert ("duplicate" in counts["rejects_by_reason"]) == dedup and counts["rejects_by_reason"]["missing_output"]
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_rejected"]


def test_split_of_no_rows_writes_empty_outputs(tmp_path):
    root = open_location(str(tmp_path))
    counts = finalize.split_kept_rejected(root / "normalized", root / "data", root / "rejects.parquet", True)
    assert counts == {"rows_in": 0, "rows_kept": 0, "rows_rejected": 0, "rejects_by_reason": {}}
    assert pq.read_table(tmp_path / "data").num_rows == 0 and pq.read_table(tmp_path / "rejects.parquet").num_rows == 0
