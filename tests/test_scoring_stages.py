"""Score -> select -> report stages on a synthetic run directory (no model needed): every id scored once, exact
top-k with ties against a sort-based reference, selections in the input's own keys, a report that opens. Score and
select run as one Ray task each, so they run through `pipeline.run_stage` on the session's Ray."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from conftest import write_canonical_data

from gradfilter_ray import pipeline, report
from gradfilter_ray.config import load
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.scorers import SCORERS

N, M = 400, 3


def build_rundir(tmp_path):
    rng = np.random.default_rng(0)
    rundir = RunDir(str(tmp_path / "run"))
    rundir.gradients.make_dir()
    ids = rng.permutation(np.arange(N, dtype=np.int64) * 7 + 3)  # sparse, unordered ids
    categories = [json.dumps({"category": "c" + str(i % 3)}) for i in ids]
    write_canonical_data(rundir.data, ids, source_rows=np.arange(N), extra=categories)
    # Scores rounded so many rows tie: early norms from a small set of values, late = early * factor.
    early = rng.choice([1.0, 2.0, 4.0], size=(N, M))
    late = early * rng.choice([0.5, 0.25], size=(N, 1))
    early[0] = 0.0  # zero early norm -> ineligible
    late[1, 0] = np.nan  # non-finite -> ineligible
    n_resp = rng.integers(1, 50, N).astype(np.int32)
    n_resp[2] = 0

    def lists(a):
        return pa.array(list(a), pa.list_(pa.float64()))

    half = N // 2
    for part, sl in enumerate([slice(0, half), slice(half, N)]):  # two files, like Ray's writer
        pq.write_table(
            pa.table(
                {
                    "id": ids[sl],
                    "sq_norm_early": lists(early[sl]),
                    "sq_norm_late": lists(late[sl]),
                    "loss_early": lists(np.ones((N, M))[sl]),
                    "loss_late": lists(np.ones((N, M))[sl]),
                    "n_response_tokens": n_resp[sl],
                    "n_tokens": n_resp[sl] + 10,
                    "ifd_loss_cond": rng.uniform(1, 3, N)[sl],
                    "ifd_loss_uncond": rng.uniform(1, 3, N)[sl],
                }
            ),
            rundir.gradients / f"part-{part}.parquet",
        )
    return rundir, ids


QUIET = {"log": lambda _: None}


@pytest.fixture
def scored(ray_cluster, tmp_path):
    rundir, ids = build_rundir(tmp_path)
    cfg = load(None, [f"output_dir={rundir.root}", "selection.ratios=[0.05, 0.1, 0.15]"])
    for upstream in ("data", "ensemble", "gradients"):  # their outputs are the synthetic ones above
        rundir.record_stage(upstream, {"status": "done", "key": pipeline.stage_key(upstream, cfg)})
    counts = pipeline.run_stage("scoring", cfg, rundir, **QUIET)
    return cfg, rundir, ids, counts


@pytest.mark.ray
def test_every_id_is_scored_once_with_reasons_counted(scored):
    cfg, rundir, ids, counts = scored
    scores = pq.read_table(rundir.scores)
    assert sorted(scores["id"].to_pylist()) == sorted(ids.tolist())
    assert counts["rows"] == N == counts["rows_eligible"] + counts["rows_ineligible"]
    assert counts["ineligible_by_reason"] == {"no_response_tokens": 1, "non_finite": 1, "zero_early_norm": 1}
    gsnr = scores["gsnr"].to_numpy(zero_copy_only=False)
    assert np.isfinite(gsnr).sum() == counts["rows_eligible"]  # NaN exactly where a reason is given
    assert (scores["reason"].is_null().to_numpy(zero_copy_only=False) == np.isfinite(gsnr)).all()
    for column in (*SCORERS, "noise", "reason", "ifd_reason"):
        assert column in scores.column_names
    no_response = scores.filter(pa.compute.equal(scores["n_response_tokens"], 0))
    for scorer in SCORERS:  # a row without a response token is eligible for no scorer
        assert np.isnan(no_response[scorer].to_numpy(zero_copy_only=False)).all(), scorer


@pytest.mark.ray
def test_selection_is_the_exact_top_k_with_ties_by_id(scored):
    cfg, rundir, ids, _ = scored
    counts = pipeline.run_stage("selection", cfg, rundir, **QUIET)
    scores = pq.read_table(rundir.scores).to_pandas()
    n_base = int((scores["n_response_tokens"] > 0).sum())
    assert counts["rows_with_response"] == n_base == N - 1
    for scorer in ("gsnr", "drop_abs", "random", "length", "ifd"):
        pool = scores[scores[scorer].notna()]
        reference = sorted(zip(-pool[scorer], pool["id"]))
        for ratio in cfg.selection.ratios:
            k = int(np.floor(ratio * n_base + 1e-9))
            expected = sorted(i for _, i in reference[:k])
            name = f"{scorer}_{ratio:g}"
            got = sorted(pq.read_table(rundir.selection / f"{name}.parquet")["id"].to_pylist())
            assert got == expected, name
            assert counts["selections"][name]["selected"] == len(expected)
    # heavy ties really happened (a check that the tie rule was exercised)
    assert scores["gsnr"].round(12).duplicated().sum() > 100
    line = (rundir.selection / "gsnr_0.05.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert set(record) == {"instruction", "input", "output", "category"}
    assert not (rundir.selection / "full.parquet").exists()  # the whole dataset is a fine-tuning option, not a scorer


@pytest.mark.ray
def test_nested_selections_and_report(scored):
    cfg, rundir, _, _ = scored
    pipeline.run_stage("selection", cfg, rundir, **QUIET)
    small = set(pq.read_table(rundir.selection / "gsnr_0.05.parquet")["id"].to_pylist())
    large = set(pq.read_table(rundir.selection / "gsnr_0.15.parquet")["id"].to_pylist())
    assert small < large
    counts = report.run(cfg, rundir, pipeline.stage_key("report", cfg))
    subsets = [c for c in rundir.selection.children() if c.endswith(".parquet")]  # beside them: stability.json
    assert counts["figures"] >= 4 and counts["selections"] == len(subsets)
    out = rundir.at("report")
    page = (out / "index.html").read_text()
    for png in ("score_histograms.png", "drop_vs_noise.png", "response_lengths.png", "overlap.png"):
        assert f"src='{png}'" in page and len((out / png).read_bytes()) > 1000
    assert "instr " in page and "Top and bottom" in page and "file://" not in page


def test_jaccard():
    assert report.jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5
    assert report.jaccard(np.array([], int), np.array([], int)) == 1.0


def test_unknown_scorer_is_a_config_error():
    from gradfilter_ray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown scorer"):
        load(None, ["scoring.scorers=[gsnr, magic]"])
