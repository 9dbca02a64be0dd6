"""The quality check's verdict (benchmarks/quality_check.py) on recovery tables: it passes a G-SNR that keeps
fewer planted rows than the pool by the margin and ranks clean rows first, and fails one that does not; the numbers
measured with shuffled and with length-grouped batches (docs/quality.md) fall on either side."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_check  # noqa: E402


def recovery(share: float, auroc: float, pool: float = 0.191) -> dict:
    row = {"scorer": "gsnr", "kind": "all", "ratio": 0.1, "k": 192, "planted_share": share, "ci_low": share - 0.04,
           "ci_high": share + 0.05, "auroc": auroc, "pool_planted_share": pool}  # fmt: skip
    return {"recovery": [row, {**row, "scorer": "random", "planted_share": pool, "auroc": 0.49}]}


@pytest.mark.parametrize(
    "share, auroc, passed",
    [
        (0.104, 0.552, True),  # shuffled batches, as measured
        (0.188, 0.454, False),  # length-grouped batches, as measured
        (0.150, 0.560, False),  # above the bar (0.191 - 0.045)
        (0.120, 0.495, False),  # below the bar but no better than chance at ranking
    ],
)
def test_the_verdict_separates_the_measured_batchings(share, auroc, passed):
    verdict = quality_check.verdict(recovery(share, auroc))
    assert verdict["passed"] is passed
    assert verdict["bar"] == pytest.approx(0.191 - quality_check.MARGIN)
    assert verdict["random_planted_share"] == 0.191
