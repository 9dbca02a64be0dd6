"""How rows are cut into shards never changes a value: extraction by the shards of a plan (each shard its own block,
as each actor call is) equals one block of all the rows, row by row, so re-sizing shards moves no selection."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_gradients_budget import assert_same_block, extraction_setup, one_torch_thread, run_block  # noqa: F401

from gradfilter_ray.gradients.shards import plan_shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return extraction_setup(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def whole(setup):
    return run_block(setup, batch_size=4)


@pytest.mark.parametrize(("max_rows", "actors"), [(6, 1), (5, 2), (4, 3)])
def test_extraction_by_shards_equals_one_block(setup, whole, max_rows, actors):
    model, tokens, pad_id = setup
    shards = plan_shards([("t.parquet", tokens.num_rows)], max_rows, actors)
    assert len(shards) == {6: 2, 5: 4, 4: 3}[max_rows]
    parts = [run_block((model, tokens.slice(s.first_row, s.rows), pad_id), batch_size=4) for s in shards]
    assert_same_block(pa.concat_tables(parts), whole)
