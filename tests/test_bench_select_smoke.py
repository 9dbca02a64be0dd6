"""benchmarks/bench_select.py's measured work (its child: the score and select passes on a synthetic run directory)
runs on the current code, on a small run directory, so the benchmark cannot rot between runs (it had, when the
scoring pass's signature changed)."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from gradfilter_ray.data.formats import CANONICAL_COLUMNS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_select  # noqa: E402


def test_the_benchmarks_passes_score_and_select_a_small_run_directory(tmp_path, capsys):
    bench_select.make_rundir(tmp_path, 3_000)
    assert set(pq.read_schema(next((tmp_path / "data").glob("*.parquet"))).names) == set(CANONICAL_COLUMNS)
    bench_select.child(str(tmp_path))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["selections"] > 10 and report["peak_rss_mib"] > 0
    assert pq.read_metadata(tmp_path / "scoring" / "scores.parquet").num_rows == 3_000
