"""NaN/inf norms and losses (and other unrankable rows) injected into a synthetic run go through score -> select ->
report flagged with a reason, counted, and never selected (score and select run as Ray tasks on the session's Ray;
no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import synthetic_run

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.scoring.scorers import GSNR_SCORERS

TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny_gpt2.yaml"
N, M = 60, 2


@pytest.mark.ray
def test_nan_and_inf_rows_are_flagged_counted_and_never_selected(ray_cluster, tmp_path):
    """Each injected row would top the G-SNR ranking (or IFD's) if its guard failed."""
    huge = [1e6] * M
    bad = {
        0: {"sq_norm_early": huge, "sq_norm_late": [np.nan, 0.0]},  # NaN late norm
        1: {"sq_norm_early": [np.inf, 1e6], "sq_norm_late": [0.0, 0.0]},  # +inf early norm
        2: {"sq_norm_early": huge, "sq_norm_late": [0.0, 0.0], "loss_late": [np.nan, 1.0]},  # NaN loss
        3: {"sq_norm_early": huge, "sq_norm_late": [0.0, 0.0], "loss_early": [np.inf, 1.0]},  # inf loss
        4: {"sq_norm_early": huge, "sq_norm_late": [0.0, -np.inf]},  # -inf late norm
        5: {"sq_norm_early": huge, "sq_norm_late": [-1.0, 0.0]},  # negative squared norm
        6: {"sq_norm_early": [0.0, 0.0], "sq_norm_late": [0.0, 0.0]},  # zero early norm
        7: {"n_response_tokens": 0, "sq_norm_early": huge, "sq_norm_late": [0.0, 0.0]},
        8: {"ifd_loss_cond": np.nan},  # IFD inputs
        9: {"ifd_loss_cond": -np.inf},
        10: {"ifd_loss_uncond": np.inf},
    }
    root = tmp_path / "run"
    overrides = ["ensemble.members=2", "ray.progress_bars=false", "finetune.scorers=[]"]
    cfg = load(TINY, [f"output_dir={root}", *overrides, "selection.ratios=[0.05, 0.5]"])
    ids = np.arange(N, dtype=np.int64) * 3 + 5
    rundir = synthetic_run(root, cfg, ids, np.random.default_rng(1), bad, parts=2)
    for stage in ("scoring", "selection", "report"):
        pipeline.run_stage(stage, cfg, rundir, log=lambda _: None)

    scores = pq.read_table(root / "scoring" / "scores.parquet").to_pandas().set_index("id")
    expected = {
        0: "non_finite",
        1: "non_finite",
        2: "non_finite",
        3: "non_finite",
        4: "non_finite",
        5: "invalid_norm",
        6: "zero_early_norm",
        7: "no_response_tokens",
    }
    for row, reason in expected.items():
        assert scores.loc[ids[row], "reason"] == reason, row
        assert np.isnan(scores.loc[ids[row], "gsnr"])  # NaN: not eligible for G-SNR
    for row in (8, 9, 10):
        assert np.isfinite(scores.loc[ids[row], "gsnr"])  # the norms are fine: only IFD excludes the row
        assert np.isnan(scores.loc[ids[row], "ifd"]) and scores.loc[ids[row], "ifd_reason"] == "non_finite"
    healthy = scores.drop(index=ids[list(expected)])
    assert healthy["reason"].isna().all() and np.isfinite(healthy["gsnr"]).all()

    manifest = rundir.read_manifest()["stages"]
    assert manifest["scoring"]["ineligible_by_reason"] == {
        "invalid_norm": 1,
        "no_response_tokens": 1,
        "non_finite": 5,
        "zero_early_norm": 1,
    }
    assert manifest["scoring"]["rows"] == N == manifest["scoring"]["rows_eligible"] + 8

    gsnr_family = [s for s in cfg.scoring.scorers if s in GSNR_SCORERS]
    for scorer in gsnr_family:
        for ratio in cfg.selection.ratios:
            chosen = set(pq.read_table(root / "selection" / f"{scorer}_{ratio:g}.parquet")["id"].to_pylist())
            assert chosen and not chosen & set(ids[list(expected)]), (scorer, ratio)
    for ratio in cfg.selection.ratios:
        chosen = set(pq.read_table(root / "selection" / f"ifd_{ratio:g}.parquet")["id"].to_pylist())
        assert chosen and not chosen & set(ids[[7, 8, 9, 10]]), ratio
    page = (root / "report" / "index.html").read_text()
    assert "non_finite" in page and "zero_early_norm" in page
