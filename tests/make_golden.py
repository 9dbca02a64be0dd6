"""Write tests/golden/tiny_alpaca_scores.json from a finished run of the tiny config with the reference run's
overrides (tests/cli_runs.py TINY_RUN): `python tests/make_golden.py RUN_DIR "what made it"`. A reviewed decision:
see tests/test_alpaca_unchanged.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq

from gradfilter_ray.scoring.scorers import SCORERS

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_alpaca_scores.json"
COLUMNS = [*SCORERS, "noise", "n_response_tokens", "n_tokens", "ifd_loss_cond", "ifd_loss_uncond"]


def main(run_dir: str, made_by: str) -> None:
    out = Path(run_dir)
    table = pq.read_table(out / "scoring" / "scores.parquet").to_pydict()
    scores = {}
    for i, rid in enumerate(table["id"]):
        row = {}
        for column in sorted(COLUMNS):
            value = table[column][i]
            row[column] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
        scores[str(rid)] = row
    selections = {
        path.stem: sorted(pq.read_table(path, columns=["id"])["id"].to_pylist())
        for path in sorted((out / "selection").glob("*.parquet"))
    }
    GOLDEN.write_text(json.dumps({"made_by": made_by, "scores": scores, "selections": selections}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
