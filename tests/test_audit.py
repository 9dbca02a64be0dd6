"""The planted-noise audit's measurement: each corruption does what it says (checked on the proxy's tokens too),
every planted row is labelled and scored once, and the recovery numbers are right: a scorer that ranks by the planted
label finds every planted row, a random scorer keeps the planted fraction within its interval, and the statistics
match independent slow references."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gradfilter_ray.audit import plant as P
from gradfilter_ray.audit.recovery import ALL, auroc, headline, markdown, recovery_table, wilson_interval
from gradfilter_ray.bundled import resolve
from gradfilter_ray.data.finalize import KEPT_SCHEMA
from gradfilter_ray.scoring.baselines import random_scores

KINDS = ["swap", "truncate", "shuffle"]


def alpaca_table(n: int) -> pa.Table:
    rows = json.loads(open(resolve("bundled:alpaca_sample_1k.json")).read())[:n]
    cols = {name: [None] * n for name in KEPT_SCHEMA.names}
    cols["id"] = list(range(100, 100 + n))
    for key in ("instruction", "input", "output"):
        cols[key] = [r[key] for r in rows]
    cols["source_format"] = ["alpaca_json"] * n
    return pa.table(cols, schema=KEPT_SCHEMA)


def chat_row(rid: int) -> dict:
    turns = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What is the weather in Paris today?"},
        {"role": "tool_call", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees and sunny in Paris today, a fine day for a walk."},
        {"role": "user", "content": "Thanks!"},
        {"role": "tool_call", "content": '{"name": "noop", "arguments": {}}'},
    ]
    return {"id": rid, "instruction": turns[1]["content"], "input": "", "output": turns[-1]["content"],
            "conversation": json.dumps(turns), "source_format": "sharegpt"}  # fmt: skip


def test_truncate_keeps_a_strict_word_prefix_of_10_to_50_percent():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(40)) + "\n\nlast  line"
    for _ in range(50):
        cut = P.truncate_text(text, rng)
        n_cut, n_all = len(cut.split()), len(text.split())
        assert text.startswith(cut) and 1 <= n_cut < n_all
        assert math.ceil(0.1 * n_all) <= n_cut <= math.ceil(0.5 * n_all)
    assert P.truncate_text("two words", rng) == "two"
    with pytest.raises(ValueError):
        P.truncate_text("one", rng)


def test_shuffle_keeps_the_words_and_changes_their_order():
    rng = np.random.default_rng(1)
    text = "the quick brown fox jumps over the lazy dog"
    for _ in range(50):
        out = P.shuffle_text(text, rng)
        assert Counter(out.split()) == Counter(text.split()) and out.split() != text.split()
    assert P.shuffle_text("a b", rng) == "b a"
    with pytest.raises(ValueError):
        P.shuffle_text("same same same", rng)


def test_plan_plants_the_fraction_in_equal_kind_shares_and_only_plantable_rows():
    n = 300
    can = np.ones(n, bool)
    can[::7] = False
    kind, donor = P.plan_planting(np.arange(n), can, 0.2, KINDS, seed=3)
    planted = ~np.equal(kind, None)
    assert planted.sum() == 60 and not (planted & ~can).any()
    assert Counter(kind[planted]) == {"swap": 20, "truncate": 20, "shuffle": 20}
    swaps = np.flatnonzero(np.equal(kind, "swap"))
    assert (donor[swaps] >= 0).all() and np.equal(kind[donor[swaps]], None).all()  # donors are clean rows
    assert (donor[~np.equal(kind, "swap")] == -1).all()
    again = P.plan_planting(np.arange(n), can, 0.2, KINDS, seed=3)
    assert (again[0] == kind).all() and (again[1] == donor).all()  # seeded
    other = P.plan_planting(np.arange(n), can, 0.2, KINDS, seed=4)[0]
    assert not (other == kind).all()
    with pytest.raises(ValueError, match="only"):
        P.plan_planting(np.arange(10), np.zeros(10, bool), 0.2, KINDS, seed=0)


def test_plant_on_real_alpaca_rows_changes_exactly_the_planted_answers():
    table = alpaca_table(200)
    planted, counts = P.plant(table, 0.2, KINDS, seed=0)
    assert planted.num_rows == 200 and planted["id"].to_pylist() == table["id"].to_pylist()
    assert counts["planted"] == 40 and counts["planted_by_kind"] == {k: 40 // 3 + (i < 40 % 3) for i, k in
                                                                      enumerate(KINDS)}  # fmt: skip
    before = {r["id"]: r for r in table.to_pylist()}
    for row in planted.to_pylist():
        old = before[row["id"]]
        assert row["instruction"] == old["instruction"] and row["input"] == old["input"]
        kind = row["planted_kind"]
        if kind is None:
            assert row["output"] == old["output"] and row["donor_id"] is None
        elif kind == "swap":
            assert row["output"] == before[row["donor_id"]]["output"] != old["output"]
            assert planted.filter(pa.compute.equal(planted["id"], row["donor_id"]))["planted_kind"][0].as_py() is None
        elif kind == "truncate":
            assert old["output"].strip().startswith(row["output"]) and len(row["output"]) < len(old["output"].strip())
        else:
            assert Counter(row["output"].split()) == Counter(old["output"].split())
            assert row["output"].split() != old["output"].split()


def test_a_conversation_is_corrupted_in_its_last_assistant_turn_and_tool_calls_are_left_alone():
    rows = [chat_row(i) for i in range(30)]
    rows = [{name: r.get(name) for name in KEPT_SCHEMA.names} for r in rows]
    table = pa.Table.from_pylist(rows, schema=KEPT_SCHEMA)
    planted, counts = P.plant(table, 0.5, ["truncate", "shuffle"], seed=0)
    assert counts["planted"] == 15
    for row in planted.to_pylist():
        turns, old = json.loads(row["conversation"]), json.loads(rows[0]["conversation"])
        assert [t for i, t in enumerate(turns) if i != 4] == [t for i, t in enumerate(old) if i != 4]
        if row["planted_kind"] is None:
            assert turns[4] == old[4]
        else:
            assert turns[4]["content"] != old[4]["content"] and turns[4]["role"] == "assistant"
        assert row["output"] == turns[-1]["content"]  # the last answer is the tool call, untouched


def test_corruptions_act_on_the_proxys_tokens():
    """Token-level: a truncated answer's tokens are a prefix of the original's; a shuffled answer keeps (nearly)
    its token count; a swapped answer's tokens are the donor's, under the real GPT-2 tokenizer."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(resolve("bundled:gpt2"))
    table = alpaca_table(120)
    planted = P.plant(table, 0.3, KINDS, seed=1)[0].to_pylist()
    before = {r["id"]: r["output"] for r in table.to_pylist()}
    seen = set()
    for row in planted:
        if row["planted_kind"] is None:
            continue
        new, old = tok(row["output"])["input_ids"], tok(before[row["id"]].strip())["input_ids"]
        if row["planted_kind"] == "truncate":
            assert len(new) < len(old) and new[:-1] == old[: len(new) - 1]  # the last word may merge differently
        elif row["planted_kind"] == "swap":
            assert new == tok(before[row["donor_id"]])["input_ids"]
        else:
            assert new != old and abs(len(new) - len(old)) <= max(3, len(old) // 4)
        seen.add(row["planted_kind"])
    assert seen == set(KINDS)


def test_wilson_interval_matches_the_closed_form_and_brackets_the_estimate():
    for x, n in [(0, 10), (3, 10), (10, 10), (40, 200), (1, 1)]:
        lo, hi = wilson_interval(x, n)
        z = 1.959963984540054
        p = x / n
        # Independent form: the roots of (p - q)^2 = z^2 q (1 - q) / n in q.
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
        roots = sorted(((-b - math.sqrt(b * b - 4 * a * c)) / (2 * a), (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
        assert (lo, hi) == pytest.approx(roots, abs=1e-12) and lo <= p <= hi
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    clean, planted = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 25).astype(float)
    slow = sum(1.0 if c > p else 0.5 if c == p else 0.0 for c, p in product(clean, planted)) / (40 * 25)
    assert auroc(clean, planted) == pytest.approx(slow, abs=1e-12)
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auroc([1.0], [2.0]) == 0.0
    assert math.isnan(auroc([], [1.0]))


def _pool(n=2000, fraction=0.2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    kind = np.full(n, None, dtype=object)
    chosen = rng.choice(n, int(fraction * n), replace=False)
    kind[chosen] = [KINDS[i % 3] for i in range(len(chosen))]
    n_resp = np.where(rng.random(n) < 0.03, 0, 50)  # a few rows without a response token
    return ids, kind, n_resp


def test_a_scorer_that_ranks_by_the_label_recovers_every_planted_row_and_random_keeps_the_fraction():
    ids, kind, n_resp = _pool()
    planted = ~np.equal(kind, None)
    oracle = np.where(planted, 0.0, 1.0) + random_scores(ids, 9) * 1e-3  # clean above planted
    anti = 1.0 - oracle
    scores = {"oracle": oracle, "anti": anti, "random": random_scores(ids, 7)}
    rows = recovery_table(scores, ids, n_resp, kind, [0.1, 0.5, 0.9], KINDS)
    assert len(rows) == 3 * 3 * 4
    by = {(r["scorer"], r["ratio"], r["kind"]): r for r in rows}
    pool_share = by[("random", 0.1, ALL)]["pool_planted_share"]
    base = n_resp > 0
    assert pool_share == pytest.approx((planted & base).sum() / base.sum())
    assert by[("oracle", 0.1, ALL)]["planted_share"] == 0.0 and by[("oracle", 0.1, ALL)]["auroc"] == 1.0
    assert by[("anti", 0.1, ALL)]["planted_share"] == 1.0 and by[("anti", 0.1, ALL)]["auroc"] == 0.0
    # At 90% of the pool the oracle must take every clean row with a response and the rest from planted ones.
    r = by[("oracle", 0.9, ALL)]
    assert r["planted_selected"] == r["k"] - (~planted & base).sum()
    for ratio in (0.1, 0.5):
        r = by[("random", ratio, ALL)]
        assert r["k"] == math.floor(ratio * base.sum()) == r["selected"]
        assert r["ci_low"] <= pool_share <= r["ci_high"]
        assert 0.4 < r["auroc"] < 0.6
    for k in KINDS:
        assert by[("oracle", 0.1, k)]["planted_share"] == 0.0 and by[("oracle", 0.1, k)]["auroc"] == 1.0
    line = headline(rows, 0.1, ("oracle", "random"))
    assert line.startswith("at 10% oracle kept 0.0% planted rows") and "random" in line
    table = markdown(rows, 0.2)
    assert table.count("\n| oracle | 0.1 |") == 1 and "AUROC clean vs each kind" in table


def test_random_selection_covers_the_planted_fraction_at_the_nominal_rate():
    """The interval is a 95% interval: over many seeds a random selection's interval holds the pool share ~95% of
    the time (a sanity check on the measurement itself, not on any scorer)."""
    ids, kind, n_resp = _pool(n=1000)
    covered = 0
    for seed in range(200):
        r = recovery_table({"random": random_scores(ids, seed)}, ids, n_resp, kind, [0.1], [])[0]
        covered += r["ci_low"] <= r["pool_planted_share"] <= r["ci_high"]
    assert 0.88 <= covered / 200 <= 0.995


def test_every_planted_row_is_scored_once():
    """The recovery join refuses scores that miss or duplicate an audit row."""
    import os
    import tempfile

    import pyarrow.parquet as pq

    from gradfilter_ray.audit.stage import write_recovery
    from gradfilter_ray.config import AuditConfig
    from gradfilter_ray.storage import open_location

    with tempfile.TemporaryDirectory() as tmp:
        root = open_location(tmp)
        ids, kind, n_resp = _pool(n=100)
        pq.write_table(
            pa.table(
                {
                    "id": ids,
                    "planted_kind": pa.array(list(kind), pa.string()),
                    "planted_visible": pa.array([None if k is None else True for k in kind], pa.bool_()),
                }
            ),
            os.path.join(tmp, "d.parquet"),
        )
        scores = pa.table({"id": ids, "n_response_tokens": n_resp, "random": random_scores(ids, 1)})
        pq.write_table(scores, os.path.join(tmp, "s.parquet"))
        audit = AuditConfig(rows=100, kinds=KINDS)
        out = write_recovery(root / "s.parquet", root / "d.parquet", root, ["random"], [0.1], audit)
        assert out["rows"] == 100 and out["planted"] == int((~np.equal(kind, None)).sum())
        # A planted row whose corruption the proxy never saw counts as clean, and is counted apart.
        hidden = [None if k is None else True for k in kind]
        hidden[int(np.flatnonzero(~np.equal(kind, None))[0])] = False
        labels = pa.table({"id": ids, "planted_kind": pa.array(list(kind), pa.string()),
                           "planted_visible": pa.array(hidden, pa.bool_())})  # fmt: skip
        pq.write_table(labels, os.path.join(tmp, "d.parquet"))
        seen = write_recovery(root / "s.parquet", root / "d.parquet", root, ["random"], [0.1], audit)
        assert seen["planted"] == out["planted"] - 1 and seen["planted_invisible"] == 1
        pq.write_table(scores.slice(1), os.path.join(tmp, "s.parquet"))
        with pytest.raises(RuntimeError, match="disagree on 1 ids"):
            write_recovery(root / "s.parquet", root / "d.parquet", root, ["random"], [0.1], audit)


def _recovery_json(ids, kind, n_resp) -> dict:
    planted = ~np.equal(kind, None)
    scores = {"gsnr": np.where(planted, 0.0, 1.0) + random_scores(ids, 3), "random": random_scores(ids, 7)}
    rows = recovery_table(scores, ids, n_resp, kind, [0.05, 0.1], KINDS)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return {"rows": len(ids), "planted": int(planted.sum()), "corrupt_fraction": 0.2, "headline_ratio": 0.1,
            "headline": headline(rows, 0.1), "recovery": rows}  # fmt: skip


def test_the_report_and_the_closing_summary_show_the_audit():
    from gradfilter_ray import report

    ids, kind, n_resp = _pool(n=300)
    audit = _recovery_json(ids, kind, n_resp)
    png = report.audit_plot(audit)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 300 <= width <= report.PAGE_WIDTH_PX and height <= 1200
    manifest = {"stages": {"audit": {"status": "done", "key": "k", "headline": audit["headline"]}}}
    summary = report.summarize_run(manifest, "runs/x")
    lines = report.summary_lines(summary)
    assert any(line.startswith("audit: at 10% gsnr kept") and "runs/x/audit/recovery.md" in line for line in lines)
    page = report.render_page(summary, [report.AUDIT_FIGURE], [], {}, None, audit)
    assert "Planted-noise audit" in page and "At " + audit["headline"].split(" (")[0][3:] in page
    assert "intervals are up to" in page and "raise audit.rows" in page  # 300 rows: k=14 at 5%, a wide interval
    assert report.audit_stage_done(manifest) and not report.audit_stage_done({"stages": {}})


def test_the_audit_has_its_own_keys_and_runs_in_run_only_when_enabled():
    from gradfilter_ray import pipeline
    from gradfilter_ray.config import load

    demo = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml")
    off = load(demo, ["audit.enabled=false"])
    on = load(demo)
    assert on.audit.enabled and "audit" not in [n for n, s in pipeline.STAGES.items() if s.in_run(off)]
    assert [n for n, s in pipeline.STAGES.items() if s.in_run(on)].index("audit") < list(pipeline.STAGES).index(
        "report"
    )
    # The audit's inner stages key on its planted data's key: never equal to the main run's, and the inner ensemble
    # still keys on the ensemble's own fields.
    main = pipeline.stage_key("ensemble", on)
    inner = pipeline.stage_key("ensemble", on, fixed={"data": "planted-a"})
    assert inner != main and inner != pipeline.stage_key("ensemble", on, fixed={"data": "planted-b"})
    wider = load(demo, ["ensemble.members=3"])
    assert pipeline.stage_key("ensemble", wider, fixed={"data": "planted-a"}) != inner
    # The main run's keys do not depend on the audit section; the audit's and the report's do.
    seeded = load(demo, ["audit.seed=5"])
    for name in ("data", "tokens", "ensemble", "gradients", "scoring", "selection"):
        assert pipeline.stage_key(name, seeded) == pipeline.stage_key(name, on)
    assert pipeline.stage_key("audit", seeded) != pipeline.stage_key("audit", on)
    assert pipeline.stage_key("report", seeded) != pipeline.stage_key("report", on)
    # Which planted rows the proxy can see depends on the proxy: a new max_length plants (and marks) again.
    shorter = load(demo, ["proxy.max_length=128"])
    assert pipeline.audit_data_key(shorter) != pipeline.audit_data_key(on)
    assert pipeline.audit_data_key(load(demo, ["scoring.eps=0.5"])) == pipeline.audit_data_key(on)


def test_rows_for_effect_gives_the_power_it_promises():
    """Simulated: with the rows it asks for, a selection drawn with planted share pool - effect falls below the
    one-sided 5% bar of random's share in about 80% of trials; with a quarter of them, far less often."""
    from gradfilter_ray.audit.recovery import Z_ONE_SIDED_95, rows_for_effect

    pool, effect, ratio = 0.2, 0.06, 0.1
    rows = rows_for_effect(pool, effect, ratio)
    assert rows_for_effect(pool, effect / 2, ratio) > 3.5 * rows  # half the effect needs ~4x the rows
    assert rows_for_effect(pool, effect, ratio, response_share=0.5) == pytest.approx(2 * rows, abs=2)
    rng = np.random.default_rng(0)

    def power(n_rows: int) -> float:
        k = int(ratio * n_rows)
        bar = pool - Z_ONE_SIDED_95 * math.sqrt(pool * (1 - pool) / k)
        return float((rng.binomial(k, pool - effect, 20_000) / k < bar).mean())

    assert 0.75 <= power(rows) <= 0.86 and power(rows // 4) < 0.45
    with pytest.raises(ValueError):
        rows_for_effect(0.2, 0.3, 0.1)


def test_a_swap_never_takes_an_answer_from_a_row_that_has_none():
    """A conversation whose answers are all tool calls has no assistant answer: it is neither planted nor a donor."""
    n = 40
    can = np.ones(n, bool)
    can[: n // 2] = False  # half the rows have no answer to give
    for seed in range(20):
        kind, donor = P.plan_planting(np.arange(n), can, 0.25, ["swap"], seed=seed)
        swaps = np.flatnonzero(np.equal(kind, "swap"))
        assert can[swaps].all() and can[donor[swaps]].all()


def _write_data(tmp_path, table):
    import pyarrow.parquet as pq

    from gradfilter_ray.storage import open_location

    folder = tmp_path / "data"
    folder.mkdir()
    # Several files and small row groups: the sample must not depend on how the corpus is cut.
    for i, start in enumerate(range(0, table.num_rows, 70)):
        pq.write_table(table.slice(start, 70), folder / f"part-{i}.parquet", row_group_size=16)
    return open_location(str(tmp_path)) / "data"


def test_the_sample_is_seeded_exact_and_marks_corruptions_the_proxy_cannot_see(tmp_path):
    """sample_and_plant streams the corpus: `rows` rows, the same ones for the same seed whatever the files, each
    planted row labelled; a truncation past proxy.max_length is marked invisible."""
    from gradfilter_ray.audit.stage import sample_and_plant
    from gradfilter_ray.config import AuditConfig, ModelSpec, ProxyConfig
    from gradfilter_ray.parquet_stream import read_columns
    from gradfilter_ray.storage import open_location

    table = alpaca_table(300)
    data = _write_data(tmp_path, table)
    proxy = ProxyConfig(model=ModelSpec(name_or_path="bundled:stories260K"), max_length=64)
    audit = AuditConfig(rows=120, corrupt_fraction=0.25, seed=2)
    out = open_location(str(tmp_path)) / "audit_data"
    counts = sample_and_plant(data, out, audit, proxy)
    got = read_columns(out, ["id", "output", "planted_kind", "planted_visible"]).to_pydict()
    assert counts["rows_in_data"] == 300 and counts["rows"] == len(got["id"]) == 120 == len(set(got["id"]))
    assert counts["planted"] == 30 and sum(k is not None for k in got["planted_kind"]) == 30
    assert set(got["id"]) <= set(table["id"].to_pylist()) and got["id"] == sorted(got["id"])
    # The same draw from the corpus in one file, and another draw for another seed.
    whole = tmp_path / "whole"
    whole.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(table, whole / "all.parquet")
    again = open_location(str(tmp_path)) / "again"
    sample_and_plant(open_location(str(whole)), again, audit, proxy)
    assert read_columns(again, ["id", "output", "planted_kind"]).to_pydict() == {
        k: got[k] for k in ("id", "output", "planted_kind")
    }
    other = open_location(str(tmp_path)) / "other"
    sample_and_plant(data, other, AuditConfig(rows=120, corrupt_fraction=0.25, seed=3), proxy)
    assert read_columns(other, ["id"])["id"].to_pylist() != got["id"]
    # At 64 tokens (stories260K's vocabulary makes Alpaca long) some truncations only cut text the proxy never sees.
    flags = dict(zip(got["planted_kind"], got["planted_visible"]))
    hidden = sum(v is False for v in got["planted_visible"])
    assert hidden == sum(counts["planted_invisible_by_kind"].values()) > 0 and flags["swap"] is not None
    assert all(v is None for k, v in zip(got["planted_kind"], got["planted_visible"]) if k is None)


def test_corruption_visible_compares_tokens_and_labels():
    before = pa.table({"id": [1, 2, 3], "input_ids": [[1, 2, 3], [4, 5], [6]], "label_start": [1, 1, 0],
                       "loss_spans": [[], [], []]})  # fmt: skip
    after = pa.table({"id": [1, 2, 3], "input_ids": [[1, 2, 3], [4, 6], [6]], "label_start": [1, 1, 1],
                      "loss_spans": [[], [], []]})  # fmt: skip
    assert P.corruption_visible(before, after).tolist() == [False, True, True]
    with pytest.raises(ValueError):
        P.corruption_visible(before, after.slice(1))
