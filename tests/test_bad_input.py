"""A hostile corpus through ingest -> score -> select -> report.

 one folder mixing malformed JSON lines, non-UTF-8 bytes, lone surrogates, a 10 MB field, empty and
whitespace instructions, non-string types, NaN constants, nested junk (one value nested 50,000 deep), non-objects,
byte-order marks, CRLF, blank lines, records sharing a user "id" and exact duplicates. Ingest must finish, account
for every row (rows in = kept + rejected, each rejection with its reason) in the manifest and the report, and the
kept rows must flow through score and select (synthetic gradient norms stand in for the model stages) into strict
JSON Lines. (Reproducibility across two runs of one config: test_reproducibility.py.)
"""

from __future__ import annotations

import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import synthetic_run

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.data.formats import PREVIEW_CHARS, REASONS, ROW_ID_FILE_STRIDE
from gradfilter_ray.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
BOM = b"\xef\xbb\xbf"
QUIET = {"log": lambda _: None}


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def good(i: int) -> dict:
    return {"instruction": f"Task {i}", "input": "ctx" if i % 2 else "", "output": f"Answer {i}"}


NESTED_EXTRA = {"instruction": "nested", "output": "kept", "meta": {"tags": ["a", {"b": [None, 2.5, {"c": []}]}]}}

# (raw line, expected reason or None when kept); a JSON Lines file, in this order.
JSONL_ROWS: list[tuple[bytes, str | None]] = [
    (BOM + j(good(0)), None),  # a byte-order mark at the start of the file
    *[(j(good(i)), None) for i in range(1, 9)],
    (b'{"instruction": "crlf", "output": "w"}\r', None),
    (j(NESTED_EXTRA), None),
    (b'{"instruction": "nan extra", "output": "z", "score": NaN, "w": -Infinity}', None),
    (j({"id": "dup-1", "instruction": "A", "output": "a"}), None),  # a shared user id is not a duplicate
    (j({"id": "dup-1", "instruction": "B", "output": "b"}), None),
    (j(good(2)), "duplicate"),  # exact duplicate content of row 2
    (b'{"instruction": "broken", "output": ', "invalid_json"),
    (b"{not json}", "invalid_json"),
    (b"}{", "invalid_json"),
    (b"\x00\x01garbage", "invalid_json"),
    (b'{"instruction": "x", "output": "y", "deep": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "invalid_json"),
    (b'{"instruction": "bad \xff\xfe bytes", "output": "x"}', "invalid_utf8"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "invalid_utf8"),
    (b'{"instruction": "\\ud800 lone surrogate", "output": "x"}', "invalid_utf8"),
    (b'{"instruction": "huge", "output": "' + b"y" * 10_000_000 + b'"}', "field_too_long"),
    (j({"instruction": "", "output": "x"}), "empty_instruction"),
    (j({"instruction": " \t\n ", "output": "x"}), "empty_instruction"),
    (j({"output": "orphan"}), "missing_instruction"),
    (b'{"instruction": NaN, "output": "x"}', "missing_instruction"),  # NaN is read as null
    (j({"instruction": "no output"}), "missing_output"),
    (j({"instruction": "blank", "output": "   "}), "empty_output"),
    (j({"instruction": 42, "output": "x"}), "wrong_type"),
    (j({"instruction": True, "output": "x"}), "wrong_type"),
    (j({"instruction": "x", "output": ["a", "list"]}), "wrong_type"),
    (j({"instruction": "x", "input": {"k": 1}, "output": "y"}), "wrong_type"),
    (j({"conversations": "junk"}), "not_text"),
    (j({"conversations": [{"from": "human", "value": "only a question"}]}), "no_assistant_turn"),
    (j({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}), "roles_out_of_order"),
    (j({"messages": [{"role": "oracle", "content": "q"}]}), "unknown_role"),
    (j({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}), "empty_turn"),
    (
        j({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"}),
        "bad_tools",
    ),
    # JSON text escaping a lone surrogate: decoded, it cannot be stored as UTF-8
    (
        j(
            {
                "conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}],
                "tools": '[{"name": "f", "description": "\\ud800"}]',
            }
        ),
        "invalid_utf8",
    ),  # fmt: skip
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b"null", "not_an_object"),
    (b"42", "not_an_object"),
]
# An Alpaca JSON list (saved with a byte-order mark): two good rows, a wrong type, a non-object.
LIST_ROWS: list[tuple[object, str | None]] = [
    (good(100), None),
    (good(101), None),
    ({"instruction": 1, "output": "x"}, "wrong_type"),
    ("not an object", "not_an_object"),
]


def write_corpus(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    lines = []
    for k, (raw, _) in enumerate(JSONL_ROWS):
        lines.append(raw)
        if k in (3, 20):  # blank and whitespace-only lines carry no row
            lines += [b"", b"   "]
    jsonl = folder / "a.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    listed = folder / "b.json"
    listed.write_bytes(BOM + json.dumps([r for r, _ in LIST_ROWS]).encode())
    return {"a": jsonl, "b": listed}


def expected_reasons() -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, reason in JSONL_ROWS + LIST_ROWS:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def strict_json(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.ray
def test_hostile_corpus_is_fully_accounted_for_through_ingest_score_select_and_report(ray_cluster, tmp_path):
    files = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    # ratio 1 for a selection holding every kept row (all have response tokens): random_1 below
    overrides = [f"data.path={tmp_path / 'corpus'}", "data.limit=null", "selection.ratios=[0.5, 1.0]"]
    cfg = load(TINY, [f"output_dir={out}", *overrides])
    rundir = RunDir(str(out))
    record = pipeline.run_stage("data", cfg, rundir, **QUIET)

    n_in = len(JSONL_ROWS) + len(LIST_ROWS)
    n_rejected = sum(1 for _, reason in JSONL_ROWS + LIST_ROWS if reason)
    assert record["rows_in"] == n_in == record["rows_kept"] + record["rows_rejected"]
    assert record["rows_rejected"] == n_rejected
    assert record["rejects_by_reason"] == expected_reasons()
    manifest = rundir.read_manifest()
    assert manifest["stages"]["data"]["rejects_by_reason"] == expected_reasons()
    checksums = {Path(i["path"]).name: i for i in manifest["inputs"]}
    for name, path in files.items():
        assert checksums[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), name
        assert checksums[path.name]["bytes"] == path.stat().st_size

    # Every rejected row is in rejects.parquet once, at its own position, with the expected reason.
    rejects = pq.read_table(rundir.rejects).to_pylist()
    data = pq.read_table(rundir.data).sort_by("id").to_pylist()
    assert len(rejects) == n_rejected and len(data) == n_in - n_rejected
    assert {r["id"] for r in rejects}.isdisjoint(r["id"] for r in data)
    assert all(r["reason"] in REASONS and len(r["raw_preview"] or "") <= PREVIEW_CHARS for r in rejects)
    by_id = {r["id"]: r for r in rejects}
    jsonl_kept_positions = [k for k, (_, reason) in enumerate(JSONL_ROWS) if reason is None]
    # JSON Lines ids are line numbers (blank lines count as lines, carry no row): rebuild them
    line_of = []
    for k in range(len(JSONL_ROWS)):
        line_of.append(k + 2 * sum(1 for b in (3, 20) if b < k))
    for k, (_, reason) in enumerate(JSONL_ROWS):
        if reason:
            assert by_id[line_of[k]]["reason"] == reason, (k, by_id.get(line_of[k]))
    huge = by_id[line_of[[k for k, (raw, _) in enumerate(JSONL_ROWS) if raw.startswith(b'{"instruction": "huge"')][0]]]
    assert huge["detail"] == f"output: 10000000 chars > {cfg.data.max_field_chars}"
    dup = [r for r in rejects if r["reason"] == "duplicate"][0]
    assert dup["detail"] == f"duplicate of id {line_of[2]}"
    assert [r["id"] for r in data if r["id"] < ROW_ID_FILE_STRIDE] == [line_of[k] for k in jsonl_kept_positions]
    assert [r["id"] for r in data if r["id"] >= ROW_ID_FILE_STRIDE] == [ROW_ID_FILE_STRIDE, ROW_ID_FILE_STRIDE + 1]

    kept = {r["instruction"]: r for r in data}
    assert "Task 0" in kept and "crlf" in kept and kept["crlf"]["output"] == "w"  # BOM and CR stripped
    assert "Task 100" in kept  # the JSON list with a BOM was read
    assert json.loads(kept["nested"]["extra"]) == {"meta": NESTED_EXTRA["meta"]}
    assert json.loads(kept["nan extra"]["extra"]) == {"score": None, "w": None}
    assert json.loads(kept["A"]["extra"]) == json.loads(kept["B"]["extra"]) == {"id": "dup-1"}

    # The kept rows go on through score, select and report.
    # Gradient norms for every kept row stand in for the model stages (recorded done for this config).
    kept_ids = np.sort(pq.read_table(rundir.data, columns=["id"])["id"].to_numpy())
    rundir = synthetic_run(out, cfg, kept_ids, np.random.default_rng(0), data=False)  # (re-reads the manifest)
    for stage in ("scoring", "selection", "report"):
        pipeline.run_stage(stage, cfg, rundir, **QUIET)
    every = [strict_json(line) for line in (out / "selection" / "random_1.jsonl").read_text().splitlines()]
    assert len(every) == len(data)
    by_instruction = {r["instruction"]: r for r in every}
    assert by_instruction["nested"]["meta"] == NESTED_EXTRA["meta"]
    assert by_instruction["nan extra"]["score"] is None and by_instruction["A"]["id"] == "dup-1"
    for path in (out / "selection").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            strict_json(line)
    # The report's row accounting: rows in = kept + rejected, and every rejection reason with its count.
    accounting = ingest_accounting((out / "report" / "index.html").read_text())
    assert accounting.pop("rows in") == n_in and accounting.pop("kept") == n_in - n_rejected
    assert accounting.pop("rejected") == n_rejected
    assert accounting == {f"rejected: {reason}": n for reason, n in expected_reasons().items()}


def ingest_accounting(page: str) -> dict[str, int]:
    """The data stage's row of the report's accounting table (class 'accounting', one row per stage): rows in, kept,
    rejected, and "rejected: <reason>" for each reason it lists."""

    class Rows(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tables: list[str] = []
            self.rows: list[list[str]] = []
            self.cell: list[str] | None = None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append(dict(attrs).get("class") or "")
            elif self.tables[-1:] == ["accounting"] and tag == "tr":
                self.rows.append([])
            elif self.tables[-1:] == ["accounting"] and tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag):
            if tag == "table" and self.tables:
                self.tables.pop()
            elif tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append("".join(self.cell).strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Rows()
    parser.feed(page)
    assert parser.rows, "the report has no accounting table"
    head, *rows = parser.rows
    data = dict(zip(head, next(row for row in rows if row[0] == "data")))
    counts = {what: int(data[what]) for what in ("rows in", "kept", "rejected")}
    for item in filter(None, data["reasons"].split(", ")):
        reason, _, n = item.rpartition(" ")
        counts[f"rejected: {reason}"] = int(n)
    return counts
