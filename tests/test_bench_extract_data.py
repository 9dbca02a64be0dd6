"""The extraction benchmark's synthetic run directory (benchmarks/extraction/common.py) holds data/ as ingest writes
it: a column the pipeline adds to data/ must reach the benchmark too (it failed unnoticed when `conversation` came)."""

import sys
from pathlib import Path

import pyarrow.parquet as pq

from gradfilter_ray.data.formats import CANONICAL_COLUMNS, NORMALIZED_SCHEMA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from extraction.common import synthetic_rows, write_rows  # noqa: E402


def test_the_benchmarks_data_has_the_canonical_columns_and_types(tmp_path):
    write_rows(tmp_path / "data", synthetic_rows(10, seed=0), rows_per_file=4)
    files = sorted((tmp_path / "data").glob("*.parquet"))
    assert len(files) == 3
    for f in files:
        schema = pq.read_schema(f)
        assert set(schema.names) == set(CANONICAL_COLUMNS)
        assert all(schema.field(c).type == NORMALIZED_SCHEMA.field(c).type for c in CANONICAL_COLUMNS), schema
