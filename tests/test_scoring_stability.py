"""Leave-one-out stability of the ensemble selections (no Ray): leave-one-out scores against a plain-arithmetic
reference, the streaming leave-one-out selections and their Jaccard against an argsort-based top-k on the whole
arrays (through the real passes, several record batches), M < 3 undefined, and the outputs (`loo_selected` in the
Parquet subsets only, `stability.json`, the report's table)."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_canonical_data

from gradfilter_ray import parquet_stream, report
from gradfilter_ray.scoring import gsnr, passes, stability
from gradfilter_ray.scoring.score_rows import score_batch
from gradfilter_ray.scoring.scorers import GSNR_SCORERS
from gradfilter_ray.scoring.selection import k_for_ratio
from gradfilter_ray.storage import open_location

EPS = 0.05
RATIOS = [0.05, 0.1, 0.25]


# ----- an independent reference: plain Python arithmetic over rows and members -----


def _reference_value(scorer: str, early: list[float], late: list[float], eps: float) -> float:
    m = len(early)
    g_e = sum(early) / m
    g_l = sum(late) / m
    drop_abs = g_e - g_l
    drop_rel = drop_abs / g_e
    noise = sum((x - g_l) ** 2 for x in late) / m
    rel_noise = noise / (g_l * g_l) if g_l * g_l > 0 else 0.0
    return {
        "g_early": g_e,
        "g_late": g_l,
        "drop_abs": drop_abs,
        "drop_rel": drop_rel,
        "gsnr": drop_rel / (noise + eps),
        "drop_over_var": drop_abs / (noise + eps),
        "scale_free": drop_rel / (rel_noise + eps),
    }[scorer]


def _reference_loo(scorer, early, late, eligible, eps):
    n, m = early.shape
    out = np.full((n, m), math.nan)
    if m < 3:
        return out
    for i in range(n):
        if not eligible[i]:
            continue
        for j in range(m):
            e = [float(early[i, c]) for c in range(m) if c != j]
            lt = [float(late[i, c]) for c in range(m) if c != j]
            try:
                value = _reference_value(scorer, e, lt, eps)
            except ZeroDivisionError:
                value = math.nan
            out[i, j] = value if math.isfinite(value) else math.nan
    return out


def _norms(seed: int, n: int, m: int):
    """Norms from a few values (many ties), with ineligible rows and rows where one member carries all early norm."""
    rng = np.random.default_rng(seed)
    early = rng.choice([1.0, 2.0, 4.0], size=(n, m))
    late = early * rng.choice([0.25, 0.5, 1.0], size=(n, m))
    early[0] = 0.0  # zero early norm: ineligible
    late[1, 0] = np.nan  # non-finite: ineligible
    early[2, 1] = -1.0  # negative norm: ineligible
    early[3] = 0.0
    early[3, 0] = 3.0  # member 0 alone has early norm: leaving it out gives G_e = 0 -> NaN
    n_resp = rng.integers(1, 40, n)
    n_resp[4] = 0  # no response token: ineligible
    return early, late, n_resp


@pytest.mark.parametrize("m", [3, 4, 5])
def test_loo_scores_match_a_plain_arithmetic_reference(m):
    early, late, n_resp = _norms(m, 60, m)
    table = gsnr.score_table(early, late, np.ones((60, m)), np.ones((60, m)), n_resp, EPS)
    eligible = table["eligible"]
    assert (~eligible).sum() >= 4
    got = stability.loo_scores(early, late, n_resp, eligible, EPS, GSNR_SCORERS)
    assert set(got) == set(GSNR_SCORERS)
    for scorer in GSNR_SCORERS:
        want = _reference_loo(scorer, early, late, eligible, EPS)
        assert got[scorer].shape == (60, m) and got[scorer].dtype == np.float64
        np.testing.assert_allclose(got[scorer], want, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=scorer)
        assert np.isnan(got[scorer][~eligible]).all()
    # leaving out the only member with an early norm makes the value undefined, only for that member
    assert np.isnan(got["gsnr"][3, 0]) and np.isfinite(got["gsnr"][3, 1:]).all()


def test_loo_scores_are_undefined_below_three_members():
    early, late, n_resp = _norms(0, 20, 2)
    got = stability.loo_scores(early, late, n_resp, np.ones(20, bool), EPS, ["gsnr"])
    assert got["gsnr"].shape == (20, 2) and np.isnan(got["gsnr"]).all()
    with pytest.raises(ValueError, match="ensemble scorers"):
        stability.loo_scores(early, late, n_resp, np.ones(20, bool), EPS, ["ifd"])


def test_score_batch_writes_loo_lists_for_the_chosen_scorers():
    early, late, n_resp = _norms(1, 30, 4)
    batch = _gradients_batch(np.arange(30, dtype=np.int64) * 3, early, late, n_resp, np.random.default_rng(1))
    scored = score_batch(batch, EPS, 0, ["gsnr", "drop_rel"])
    assert "gsnr_loo" in scored.column_names and "drop_rel_loo" in scored.column_names
    assert "g_early_loo" not in scored.column_names and "ifd_loo" not in scored.column_names
    assert scored.schema.field("gsnr_loo").type == pa.list_(pa.float64())
    values = np.array(scored["gsnr_loo"].to_pylist())
    eligible = ~np.isnan(scored["gsnr"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(values, _reference_loo("gsnr", early, late, eligible, EPS), rtol=1e-12, equal_nan=True)
    assert scored["gsnr_loo"].null_count == 0  # NaN, never null
    assert not any(c.endswith("_loo") for c in score_batch(batch, EPS, 0, []).column_names)


# ----- the streaming passes on a small run directory (many record batches) -----


def _lists(a):
    return pa.array([list(r) for r in a], pa.list_(pa.float64()))


def _gradients_batch(ids, early, late, n_resp, rng):
    n, m = early.shape
    return pa.RecordBatch.from_pydict(
        {
            "id": pa.array(ids, pa.int64()),
            "sq_norm_early": _lists(early),
            "sq_norm_late": _lists(late),
            "loss_early": _lists(np.ones((n, m))),
            "loss_late": _lists(np.ones((n, m))),
            "n_response_tokens": pa.array(n_resp, pa.int32()),
            "n_tokens": pa.array(n_resp + 10, pa.int32()),
            "ifd_loss_cond": rng.uniform(1, 3, n),
            "ifd_loss_uncond": rng.uniform(1, 3, n),
        }
    )


def _rundir(tmp_path, n: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    root = open_location(str(tmp_path / "run"))
    ids = rng.permutation(np.arange(n, dtype=np.int64) * 7 + 3)  # sparse, unordered ids
    early, late, n_resp = _norms(seed, n, m)
    categories = [json.dumps({"category": "c" + str(i % 3)}) for i in ids]
    write_canonical_data(root / "data", ids, source_rows=np.arange(n), extra=categories, row_group_size=97)
    (root / "gradients").make_dir()
    half = n // 2
    for part, sl in enumerate([slice(0, half), slice(half, n)]):
        batch = _gradients_batch(ids[sl], early[sl], late[sl], n_resp[sl], rng)
        pq.write_table(pa.Table.from_batches([batch]), (root / "gradients" / f"part-{part}.parquet").path)
    return root


@pytest.fixture
def small_batches(monkeypatch):
    """Every streaming read in record batches of 37 rows, so each pass sees many chunks."""
    original = parquet_stream.stream_batches

    def stream(where, columns=None, batch_rows=37):
        return original(where, columns, batch_rows=37)

    monkeypatch.setattr(passes, "stream_batches", stream)


def _brute_top_k(ids, values, k):
    """np.argsort-based top k (score descending, smaller id first) of the non-NaN rows, as a set of ids."""
    ok = ~np.isnan(values)
    pool_ids, pool_values = ids[ok], values[ok]
    order = np.argsort(pool_ids, kind="stable")
    order = order[np.argsort(-pool_values[order], kind="stable")]
    return set(pool_ids[order[:k]].tolist())


def _score_and_select(root, scorers, ratios=RATIOS):
    counts = passes.score_gradients(root / "gradients", root / "scoring" / "scores.parquet", EPS, 0, scorers)
    selected = passes.select_and_write(
        root / "scoring" / "scores.parquet", root / "data", root / "selection", scorers, ratios
    )
    return counts, selected


def _stability(root):
    return json.loads((root / "selection" / "stability.json").read_text())


N, M = 500, 4


@pytest.mark.parametrize("seed", [0, 1])
def test_loo_selections_and_jaccard_match_a_brute_force_reference(tmp_path, small_batches, seed):
    root = _rundir(tmp_path, N, M, seed)
    scorers = ["gsnr", "drop_abs", "g_late", "random"]
    _, selected = _score_and_select(root, scorers)
    scores = pq.read_table((root / "scoring" / "scores.parquet").path)
    assert not any(c in scores.column_names for c in ("random_loo", "ifd_loo", "length_loo", "scale_free_loo"))
    ids = scores["id"].to_numpy()
    n_base = int((scores["n_response_tokens"].to_numpy() > 0).sum())
    assert n_base == N - 1
    written = _stability(root)
    assert list(written) == [f"{s}_{r:g}" for s in ("gsnr", "drop_abs", "g_late") for r in RATIOS]
    ties = 0
    for scorer in ("gsnr", "drop_abs", "g_late"):
        full_values = scores[scorer].to_numpy(zero_copy_only=False)
        loo = np.array(scores[f"{scorer}_loo"].to_pylist())
        assert loo.shape == (N, M)
        ties += int(np.unique(loo[~np.isnan(loo)], return_counts=True)[1].max())
        for ratio in RATIOS:
            name = f"{scorer}_{ratio:g}"
            k = k_for_ratio(ratio, n_base)
            full = _brute_top_k(ids, full_values, k)
            loo_sets = [_brute_top_k(ids, loo[:, j], k) for j in range(M)]
            per_member = [len(full & s) / len(full | s) for s in loo_sets]
            record = written[name]
            assert record["members"] == M
            np.testing.assert_allclose(record["jaccard_per_member"], per_member, rtol=1e-12, err_msg=name)
            assert record["mean_jaccard"] == pytest.approx(np.mean(per_member), rel=1e-12)
            assert selected["selections"][name]["mean_jaccard"] == record["mean_jaccard"]
            subset = pq.read_table((root / "selection" / f"{name}.parquet").path)
            assert set(subset["id"].to_pylist()) == full
            expected = {i: sum(i in s for s in loo_sets) for i in full}
            got = dict(zip(subset["id"].to_pylist(), subset["loo_selected"].to_pylist()))
            assert got == expected, name
            in_all = sum(c == M for c in expected.values())
            assert record["rows_in_all_loo"] == in_all
            assert record["share_in_all_loo"] == pytest.approx(in_all / len(full))
            assert "reason" not in record
    assert ties > 20  # heavy ties really happened, so the id tie-break decided members of the selections
    assert 0 < np.mean([r["mean_jaccard"] for r in written.values()]) < 1  # the selections are not all identical
    # baselines: no stability, no loo column
    assert "random_0.1" not in written and "mean_jaccard" not in selected["selections"]["random_0.1"]
    assert "loo_selected" not in pq.read_schema((root / "selection" / "random_0.1.parquet").path).names


def test_jsonl_stays_in_the_inputs_own_keys(tmp_path, small_batches):
    root = _rundir(tmp_path, 200, 3)
    _score_and_select(root, ["gsnr", "random"], [0.1])
    lines = open((root / "selection" / "gsnr_0.1.jsonl").path).read().splitlines()
    assert len(lines) == 19
    for line in lines:
        assert set(json.loads(line)) == {"instruction", "input", "output", "category"}
    subset = pq.read_table((root / "selection" / "gsnr_0.1.parquet").path)
    assert subset.schema.field("loo_selected").type == pa.int64()
    assert all(0 <= c <= 3 for c in subset["loo_selected"].to_pylist())


def test_two_members_give_null_with_the_reason(tmp_path, small_batches):
    root = _rundir(tmp_path, 120, 2)
    _, selected = _score_and_select(root, ["gsnr", "scale_free", "length"], [0.1])
    scores = pq.read_table((root / "scoring" / "scores.parquet").path)
    assert np.isnan(np.array(scores["gsnr_loo"].to_pylist())).all()
    written = _stability(root)
    assert set(written) == {"gsnr_0.1", "scale_free_0.1"}
    for record in written.values():
        assert record["members"] == 2 and record["mean_jaccard"] is None
        assert record["reason"] == "undefined for M < 3"
    assert selected["selections"]["gsnr_0.1"]["mean_jaccard"] is None
    subset = pq.read_table((root / "selection" / "gsnr_0.1.parquet").path)
    assert subset.num_rows == 11 and subset["loo_selected"].null_count == 11


def test_old_scores_without_loo_columns_still_select(tmp_path, small_batches):
    root = _rundir(tmp_path, 120, 3)
    passes.score_gradients(root / "gradients", root / "scoring" / "scores.parquet", EPS, 0, ["random"])
    passes.select_and_write(root / "scoring" / "scores.parquet", root / "data", root / "selection", ["gsnr"], [0.1])
    record = _stability(root)["gsnr_0.1"]
    assert record["mean_jaccard"] is None and "re-run the scoring stage" in record["reason"]


def test_empty_selection_parquet_has_the_loo_column(tmp_path, small_batches):
    root = _rundir(tmp_path, 30, 3)
    _score_and_select(root, ["gsnr"], [0.01])  # k = 0
    empty = pq.read_table((root / "selection" / "gsnr_0.01.parquet").path)
    assert empty.num_rows == 0 and "loo_selected" in empty.column_names
    record = _stability(root)["gsnr_0.01"]
    assert record["mean_jaccard"] == 1.0 and record["share_in_all_loo"] is None


# ----- the pure summary -----


def test_selection_stability_counts_and_jaccard():
    full = np.array([5, 1, 3, 9])
    loo = [np.array([1, 3, 5, 9]), np.array([1, 3, 5, 7]), np.array([2, 4, 6, 8])]
    record, ids, counts = stability.selection_stability(full, loo)
    assert ids.tolist() == [1, 3, 5, 9] and counts.tolist() == [2, 2, 2, 1]
    assert record["jaccard_per_member"] == [1.0, 3 / 5, 0.0]
    assert record["mean_jaccard"] == pytest.approx(8 / 15)
    assert (record["rows_in_all_loo"], record["share_in_all_loo"]) == (0, 0.0)
    record, _, counts = stability.selection_stability(np.array([2, 1]), [np.array([], int), np.array([1]), full])
    assert record["jaccard_per_member"] == [0.0, 0.5, 0.2] and counts.tolist() == [2, 0]
    record, _, counts = stability.selection_stability(full, loo[:2])
    assert record["mean_jaccard"] is None and record["reason"] == stability.UNDEFINED and not counts.any()
    assert stability.ranked_ids(np.array([4, 2, 9, 1]), np.array([1.0, 2.0, 1.0, 1.0]))[:3].tolist() == [2, 1, 4]


# ----- the report -----


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text = ""

    def handle_data(self, data):
        self.text += data


def test_report_shows_the_stability_table():
    summary = report.summarize_run({"stages": {}})
    table = {
        "gsnr_0.1": {
            "members": 4,
            "mean_jaccard": 0.8125,
            "jaccard_per_member": [0.75, 0.875, 0.8, 0.825],
            "rows_in_all_loo": 30,
            "share_in_all_loo": 0.6,
        },
        "drop_rel_0.1": stability.undefined(2),
    }
    page = report.render_page(summary, [], [], {}, table)
    parsed = _Text()
    parsed.feed(page)
    text = parsed.text
    assert "Selection stability" in text and "0.812" in text and "60.0 %" in text
    assert "undefined for M < 3" in text and "more members" in text
    assert page.index("Selection stability") < page.index("id='plots'")
    assert "Selection stability" not in report.render_page(summary, [], [], {})


def test_built_report_reads_stability_json(tmp_path, small_batches):
    from gradfilter_ray.rundir import RunDir

    root = _rundir(tmp_path, 200, 3)
    _score_and_select(root, ["gsnr", "random"], [0.1])
    run = RunDir(str(tmp_path / "run"))
    report.build_report(run, ["gsnr", "random"], [0.1], {"stages": {}})
    parsed = _Text()
    parsed.feed((run.at("report") / "index.html").read_text())
    record = _stability(root)["gsnr_0.1"]
    assert "Selection stability" in parsed.text and f"{record['mean_jaccard']:.3f}" in parsed.text
    assert "random_0.1" not in parsed.text.split("Selection stability")[1].split("Plots")[0]
