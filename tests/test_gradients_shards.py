"""Extraction's shards without Ray: the plan covers every row once in the fewest shards that is a multiple of the
actors with none over shard_rows, a recorded plan is kept on resume, a marker commits exactly its shard for its key,
leftovers are cleared, and a shard's rows are read from the right row groups."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.config import Config, GradientsConfig
from gradfilter_ray.gradients.shards import (
    PLAN,
    Shard,
    keep_and_clear,
    plan_record,
    plan_shards,
    recorded_plan,
    shard_count,
)
from gradfilter_ray.gradients.stage import actor_pool_args, memory_fraction, shard_plan
from gradfilter_ray.parquet_stream import read_rows, row_counts, write_whole
from gradfilter_ray.storage import Location


@pytest.mark.parametrize("actors", [1, 2, 3, 8])
@pytest.mark.parametrize("shard_rows", [1, 3, 4, 10, 100])
def test_the_plan_covers_every_row_of_every_file_once(shard_rows, actors):
    files = [("a.parquet", 10), ("b.parquet", 0), ("c.parquet", 7)]
    shards = plan_shards(files, shard_rows, actors)
    assert [s.index for s in shards] == list(range(len(shards)))
    for name, rows in files:
        mine = [s for s in shards if s.file == name]
        covered = [r for s in mine for r in range(s.first_row, s.stop_row)]
        assert covered == list(range(rows))
        assert all(0 < s.rows <= shard_rows for s in mine)
    assert len({s.part for s in shards}) == len({s.marker for s in shards}) == len(shards)


def slowest_count(total: int, actors: int, max_rows: int) -> int:
    """Reference: try every count, smallest first, for the first multiple of `actors` whose even split of one file
    leaves no shard over `max_rows` (or one row per shard)."""
    for count in range(1, total + 1):
        sizes = [len(range(i, total, count)) for i in range(count)]  # `total` rows dealt round-robin: an even split
        if (count % actors == 0 or count == total) and max(sizes) <= max_rows:
            return count
    return 0


def test_the_shard_count_is_the_fewest_multiple_of_the_actors_with_none_over_shard_rows():
    for total in [0, 1, 5, 16, 17, 100, 400, 1001]:
        for actors in [1, 2, 3, 8, 16]:
            for max_rows in [1, 4, 7, 100, 4096]:
                got = shard_count(total, actors, max_rows)
                assert got == slowest_count(total, actors, max_rows), (total, actors, max_rows)
                shards = plan_shards([("t.parquet", total)], max_rows, actors)
                assert len(shards) == got and all(s.rows <= max_rows for s in shards)
                assert max(s.rows for s in shards) - min(s.rows for s in shards) <= 1 if shards else total == 0


def test_the_shipped_configs_plans():
    # alpaca_llama2_7b/13b: Alpaca's 52,002 rows (one tokens/ file under 65,536 rows), 8 actors, at most 4,096 rows:
    # 16 shards of 3,250-3,251, two per actor, where fixed 4,096-row shards made 13 (a second wave on 5 of 8 GPUs).
    alpaca = plan_shards([("t.parquet", 52_002)], 4096, 8)
    assert [s.rows for s in alpaca] == [3251] * 2 + [3250] * 14
    assert (alpaca[0].first_row, alpaca[1].first_row, alpaca[-1].stop_row) == (0, 3251, 52_002)
    assert [s.rows for s in plan_shards([("t.parquet", 400)], 100, 1)] == [100] * 4  # demo.yaml: 4 shards of 100
    assert len(plan_shards([("t.parquet", 12_000)], 4096, 8)) == 8  # a 12,000-row audit sample: one per actor
    million = plan_shards([("t.parquet", 1_000_000)], 4096, 16)  # million_template.yaml, as one file
    assert len(million) == 256 and {s.rows for s in million} == {3906, 3907}


def test_files_share_the_count_by_their_rows_and_shards_never_span_files():
    files = [("a.parquet", 3 * 65_536), ("b.parquet", 70_000), ("c.parquet", 10), ("d.parquet", 0)]
    shards = plan_shards(files, 4096, 16)
    assert len(shards) == 81  # the 80 of shard_count, plus the one file c's 10 rows need
    for name, rows in files:
        mine = [s for s in shards if s.file == name]
        assert [r for s in mine for r in range(s.first_row, s.stop_row)] == list(range(rows))
        if mine:
            assert max(s.rows for s in mine) - min(s.rows for s in mine) <= 1
    assert [len([s for s in shards if s.file == n]) for n, _ in files] == [59, 21, 1, 0]  # 80 x 196,608/266,618 ...
    assert all(s.rows <= 4096 for s in shards) and [s.index for s in shards] == list(range(81))


def test_a_recorded_plan_is_kept_for_its_key_and_files_whatever_the_actor_count():
    files = [("a.parquet", 1000), ("b.parquet", 300)]
    eight = plan_shards(files, 100, 8)
    record = json.loads(json.dumps(plan_record("k", files, eight)))  # as read back from plan.json
    assert recorded_plan(record, "k", files, 100) == eight
    # The driver keeps it when the actor count changed (num_actors is not keyed: a new width redoes nothing) ...
    assert shard_plan(GradientsConfig(shard_rows=100, num_actors=3), files, record, "k") == eight
    assert len(shard_plan(GradientsConfig(shard_rows=100, num_actors=3), files, None, "k")) == 15
    # ... and plans anew for another key, other files or row counts, a lower shard_rows, or a damaged record.
    assert recorded_plan(record, "other", files, 100) is None
    assert recorded_plan(record, "k", [("a.parquet", 1000), ("b.parquet", 301)], 100) is None
    assert recorded_plan(record, "k", files[:1], 100) is None
    assert max(s.rows for s in eight) == 84 and recorded_plan(record, "k", files, 83) is None
    assert recorded_plan(record, "k", files, 1000) == eight  # a higher bound still holds for the recorded shards
    gap = {**record, "shards": record["shards"][:3] + record["shards"][4:]}
    assert recorded_plan(gap, "k", files, 100) is None
    shifted = {**record, "shards": [{**record["shards"][0], "stop_row": 90}] + record["shards"][1:]}
    assert recorded_plan(shifted, "k", files, 100) is None
    for broken in (None, [], {"key": "k"}, {**record, "shards": [{"index": 0}]}):
        assert recorded_plan(broken, "k", files, 100) is None


def test_the_actor_pool_keeps_one_shard_in_flight_per_actor():
    cfg = Config(gradients=GradientsConfig(num_actors=8, gpus_per_actor=1, cpus_per_actor=4))
    args = actor_pool_args(cfg, 8)
    assert args["compute"].max_tasks_in_flight_per_actor == 1
    assert (args["compute"].min_size, args["compute"].max_size) == (8, 8)
    assert (args["num_cpus"], args["num_gpus"]) == (4, 1)


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
    # the recorded plan stays (the driver rewrites it)
    assert keep_and_clear(shards, good, [*files, PLAN], "k")[2] == delete
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
