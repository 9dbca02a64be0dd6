"""The planted-noise audit end to end: `gradfilter-ray audit` on the session's finished reference run of the tiny
config (tests/cli_runs.py): its own run directory, every sampled row planted or not and scored once, the main run's
outputs untouched by it, its results in recovery.json and the closing summary. (The report's audit section, drawn
when `audit.enabled` runs it inside `run`, is tested on its own in test_audit.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gradfilter_ray.rundir import RunDir

pytestmark = pytest.mark.slow


def read(where) -> pq.Table:
    return pq.read_table(where.path, filesystem=where.filesystem)


def test_the_audit_plants_scores_and_reports_in_its_own_run_directory(reference_run):
    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    assert reference_run["audit_rc"] == 0, reference_run["audit_log"][-4000:]
    assert reference_run["audit_left_after"] == []  # a clean exit shuts its Ray down
    run = RunDir(str(reference_run["out"]))
    manifest = run.read_manifest()
    record = manifest["stages"]["audit"]
    assert record["status"] == "done"
    audit = run.subdir("audit")
    data, planted = read(run.data), read(audit.data)
    assert planted.num_rows == data.num_rows == 16  # fewer kept rows than audit.rows: every one is sampled
    kinds = planted["planted_kind"].to_pylist()
    assert sum(k is not None for k in kinds) == round(0.2 * 16) == record["planted"] + record["planted_invisible"]
    assert sum(v is False for v in planted["planted_visible"].to_pylist()) == record["planted_invisible"]
    # Every audit row scored exactly once, by the audit's own ensemble (its own manifest and keys).
    assert sorted(read(audit.scores)["id"].to_pylist()) == sorted(planted["id"].to_pylist())
    inner = audit.read_manifest()["stages"]
    assert inner["ensemble"]["members"] == 2 and inner["ensemble"]["key"] != manifest["stages"]["ensemble"]["key"]
    # The main run never sees a planted row: its data, tokens and scores hold the original rows only.
    original = {r["id"]: r for r in data.to_pylist()}
    for row in planted.to_pylist():
        same = row["output"] == original[row["id"]]["output"]
        assert same == (row["planted_kind"] is None), row["id"]
    assert "planted_kind" not in data.column_names and "planted_kind" not in read(run.scores).column_names
    recovery = json.loads((run.audit / "recovery.json").read_text())
    assert {r["scorer"] for r in recovery["recovery"]} == set(manifest["config"]["scoring"]["scorers"])
    assert recovery["rows"] == 16 and recovery["headline"] == record["headline"]
    assert (run.audit / "recovery.csv").read_text().startswith("scorer,ratio,kind,k,")
    assert f"audit: {record['headline']}" in reference_run["audit_log"]  # the closing summary's line
    # The main run's records are the same before and after the audit: it ran only its own stage.
    assert "[data] already done" not in reference_run["audit_log"] and "[audit] done in" in reference_run["audit_log"]


def test_real_conversations_are_corrupted_in_their_last_assistant_turn_only():
    """The chat demo's real glaive conversations: planting changes one turn of a planted row, an assistant turn,
    the last one; tool calls and tool results stay as they were."""
    import pyarrow as pa

    from gradfilter_ray.audit.plant import last_assistant_turn, plant
    from gradfilter_ray.bundled import resolve
    from gradfilter_ray.data.conversations import canonical_turns
    from gradfilter_ray.data.finalize import KEPT_SCHEMA

    records = json.loads(Path(resolve("bundled:glaive_toolcall_en_demo.json")).read_text())[:120]
    rows = []
    for i, rec in enumerate(records):
        turns = canonical_turns(rec)[0]
        if last_assistant_turn(turns) is None:
            continue
        rows.append({"id": i, "instruction": turns[0]["content"], "input": "", "output": turns[-1]["content"],
                     "conversation": json.dumps(turns), "source_format": "sharegpt"})  # fmt: skip
    table = pa.Table.from_pylist([{k: r.get(k) for k in KEPT_SCHEMA.names} for r in rows], schema=KEPT_SCHEMA)
    planted, counts = plant(table, 0.3, ["swap", "truncate", "shuffle"], seed=0)
    assert counts["planted"] == round(0.3 * len(rows)) > 20
    before = {r["id"]: json.loads(r["conversation"]) for r in rows}
    for row in planted.to_pylist():
        turns, old = json.loads(row["conversation"]), before[row["id"]]
        changed = [i for i, (a, b) in enumerate(zip(turns, old)) if a != b]
        assert len(turns) == len(old)
        assert changed == ([] if row["planted_kind"] is None else [last_assistant_turn(old)])


def test_on_the_real_audit_an_oracle_finds_every_planted_row_and_random_keeps_the_planted_share(reference_run):
    """The measurement itself, on the audit's real rows and labels (not G-SNR): a scorer that ranks by the planted
    label keeps no planted row while clean rows remain, and the run's random scorer keeps the pool's share within
    its interval."""
    import numpy as np

    from gradfilter_ray.audit.recovery import ALL, recovery_table

    assert reference_run["audit_rc"] == 0, reference_run["audit_log"][-4000:]
    audit = RunDir(str(reference_run["out"])).subdir("audit")
    labels = read(audit.data).to_pydict()
    scores = read(audit.scores).to_pydict()
    kind_of = {
        i: (k if v else None) for i, k, v in zip(labels["id"], labels["planted_kind"], labels["planted_visible"])
    }
    ids = np.array(scores["id"])
    kinds = np.array([kind_of[i] for i in scores["id"]], dtype=object)
    oracle = np.where(np.equal(kinds, None), 1.0, 0.0)
    rows = recovery_table({"oracle": oracle, "random": np.array(scores["random"], dtype=float)}, ids,
                          np.array(scores["n_response_tokens"]), kinds, [0.5], [])  # fmt: skip
    by = {r["scorer"]: r for r in rows if r["kind"] == ALL}
    assert by["oracle"]["pool_planted"] >= 1  # the seeded tiny audit plants rows whose corruption the proxy sees
    assert by["oracle"]["planted_selected"] == 0 and by["oracle"]["auroc"] == 1.0
    assert by["random"]["ci_low"] <= by["random"]["pool_planted_share"] <= by["random"]["ci_high"]
