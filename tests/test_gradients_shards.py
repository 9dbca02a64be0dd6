"""Extraction's shards without Ray: the plan covers every row once, a marker commits exactly its shard for its key,
leftovers are cleared, and a shard's rows are read from the right row groups."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.config import GradientsConfig
from gradfilter_ray.gradients.shards import Shard, keep_and_clear, plan_shards
from gradfilter_ray.gradients.stage import memory_fraction
from gradfilter_ray.parquet_stream import read_rows, row_counts, write_whole
from gradfilter_ray.storage import Location


@pytest.mark.parametrize("shard_rows", [1, 3, 4, 10, 100])
def test_the_plan_covers_every_row_of_every_file_once(shard_rows):
    files = [("a.parquet", 10), ("b.parquet", 0), ("c.parquet", 7)]
    shards = plan_shards(files, shard_rows)
    assert [s.index for s in shards] == list(range(len(shards)))
    for name, rows in files:
        mine = [s for s in shards if s.file == name]
        covered = [r for s in mine for r in range(s.first_row, s.stop_row)]
        assert covered == list(range(rows))
        assert all(0 < s.rows <= shard_rows for s in mine)
    assert len({s.part for s in shards}) == len({s.marker for s in shards}) == len(shards)


def test_a_marker_commits_only_its_own_shard_and_key():
    shard = Shard(3, "a.parquet", 8, 12)
    record = shard.marker_record("k1", rows=4, seconds=1.0)
    assert shard.committed_by(record, "k1")
    assert not shard.committed_by(record, "k2")  # another config's result
    assert not shard.committed_by(None, "k1")
    assert not Shard(3, "a.parquet", 8, 11).committed_by(record, "k1")  # another layout (shard_rows changed)
    assert not Shard(3, "b.parquet", 8, 12).committed_by(record, "k1")


def test_resume_keeps_committed_shards_and_clears_everything_else():
    shards = plan_shards([("t.parquet", 10)], 4)  # 3 shards
    good = {shards[0].marker: shards[0].marker_record("k")}
    stale_key = {shards[1].marker: shards[1].marker_record("old")}
    files = [shards[0].part, shards[0].marker, shards[1].part, shards[1].marker, shards[2].part, "stray.parquet"]
    done, todo, delete = keep_and_clear(shards, {**good, **stale_key}, files, "k")
    assert done == [shards[0]] and todo == shards[1:]
    # a part without a marker (killed between the two writes), another key's shard and a stray file all go
    assert delete == sorted([shards[1].part, shards[1].marker, shards[2].part, "stray.parquet"])
    # a marker whose part is gone commits nothing (and goes too)
    done, todo, delete = keep_and_clear(shards, good, [shards[0].marker], "k")
    assert done == [] and todo == shards and delete == [shards[0].marker]


def test_read_rows_returns_exactly_the_range_across_row_groups(tmp_path):
    where = Location(str(tmp_path / "t.parquet"), pafs.LocalFileSystem())
    table = pa.table({"id": list(range(23)), "x": [str(i) for i in range(23)]})
    pq.write_table(table, where.path, row_group_size=5)
    assert row_counts([where]) == [23]
    for first, stop in [(0, 23), (0, 5), (4, 6), (5, 10), (7, 19), (22, 23), (10, 10)]:
        got = read_rows(where, first, stop, ["id"])
        assert got["id"].to_pylist() == list(range(first, stop)), (first, stop)
        assert got.column_names == ["id"]


def test_write_whole_is_one_readable_file(tmp_path):
    where = Location(str(tmp_path / "sub" / "p.parquet"), pafs.LocalFileSystem())
    write_whole(where, pa.table({"id": [1, 2]}))
    assert pq.read_table(where.path)["id"].to_pylist() == [1, 2]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.parquet"]  # no temporary left beside it


def test_actors_sharing_a_gpu_cap_their_memory():
    assert memory_fraction(GradientsConfig(gpus_per_actor=0.5)) == 0.475  # the share less room for the CUDA context
    assert memory_fraction(GradientsConfig(gpus_per_actor=1)) is None
    assert memory_fraction(GradientsConfig(gpus_per_actor=0)) is None
    assert memory_fraction(GradientsConfig(gpus_per_actor=1, gpu_memory_fraction=0.9)) == 0.9
