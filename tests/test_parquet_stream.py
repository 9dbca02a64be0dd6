"""parquet_stream helpers that answer from the footers: what they count equals counting the rows themselves."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from gradfilter_ray.parquet_stream import non_null_count, parquet_files
from gradfilter_ray.storage import open_location


def test_non_null_count_from_footers_and_from_row_groups_without_statistics(tmp_path):
    values = [None if i % 3 else f'[{{"name": "f{i}"}}]' for i in range(20)]
    nested = pa.array([{"a": i, "b": None} for i in range(20)])  # two leaf columns before `tools`
    table = pa.table({"id": list(range(20)), "nested": nested, "tools": pa.array(values, pa.string())})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=6)
    pq.write_table(table.slice(0, 7), tmp_path / "b.parquet", row_group_size=4, write_statistics=False)
    pq.write_table(table.drop_columns(["tools"]), tmp_path / "c.parquet")  # written before the column existed
    files = parquet_files(open_location(str(tmp_path)))
    assert len(files) == 3
    want = sum(v is not None for v in values) + sum(v is not None for v in values[:7])
    assert non_null_count(files, "tools") == want == 10
    assert non_null_count(files, "absent") == 0
