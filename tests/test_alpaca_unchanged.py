"""Reading conversations changed nothing for Alpaca data: the session's reference run of the tiny config (Alpaca
rows, tests/cli_runs.py) scores and selects exactly as the code did before conversations were read. The reference
is tests/golden/tiny_alpaca_scores.json, written by that earlier code (commit 98b0b4d) from the same config and
overrides; regenerate it only for a change that is meant to move Alpaca scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_alpaca_scores.json"


def test_alpaca_scores_and_selections_equal_those_from_before_conversations(reference_run):
    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    golden = json.loads(GOLDEN.read_text())
    out = Path(reference_run["out"])
    scores = pq.read_table(out / "scoring" / "scores.parquet").to_pydict()
    assert sorted(str(i) for i in scores["id"]) == sorted(golden["scores"])
    compared = 0
    for i, rid in enumerate(scores["id"]):
        for column, want in golden["scores"][str(rid)].items():
            got = scores[column][i]
            if want is None:
                assert got is None or math.isnan(got), (rid, column)
            else:
                assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (rid, column)
                compared += 1
    assert compared > 16 * 10  # every scorer of every row, not a lucky subset
    for name, ids in golden["selections"].items():
        assert sorted(pq.read_table(out / "selection" / f"{name}.parquet")["id"].to_pylist()) == ids, name
