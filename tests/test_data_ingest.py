"""Ingest stage on a real local Ray: every bad-input kind lands in rejects with its reason, counts reconcile."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradfilter_ray.config import DataConfig
from gradfilter_ray.data import ingest
from gradfilter_ray.data.formats import ROW_ID_FILE_STRIDE
from gradfilter_ray.data.sources import SourceError
from gradfilter_ray.storage import open_location

pytestmark = pytest.mark.ray

GOOD = [{"instruction": f"Task {i}", "input": "ctx" if i % 2 else "", "output": f"Answer {i}"} for i in range(20)]

BAD_LINES = {
    "invalid_json": b'{"instruction": "broken", "output": ',
    "invalid_utf8": b'{"instruction": "bad \xff\xfe bytes", "output": "x"}',
    "not_an_object": b"[1, 2, 3]",
    "missing_output": b'{"instruction": "no output"}',
    "empty_output": b'{"instruction": "empty", "output": "   "}',
    "missing_instruction": b'{"output": "orphan"}',
    "empty_instruction": b'{"instruction": "", "output": "x"}',
    "wrong_type": b'{"instruction": "typed", "output": 3.5}',
    "field_too_long": json.dumps({"instruction": "long", "output": "y" * 5000}).encode(),
}


def write_jsonl(path, records, bad=()):
    lines = [json.dumps(r).encode() for r in records] + list(bad)
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is not a row
    return path


def read_data(folder):
    return pq.read_table(folder).sort_by("id")


def run_ingest(tmp_path, path, **overrides):
    """ingest into `tmp_path/out` (data/, rejects.parquet, its scratch folder): the outputs and the counts."""
    root = open_location(str(tmp_path / "out"))
    data, rejects, scratch = root / "data", root / "rejects.parquet", root / "scratch"
    counts = ingest.ingest(DataConfig(path=str(path), max_field_chars=1000, **overrides), data, rejects, scratch)
    # it writes its two outputs and, otherwise, only its scratch folder (which the caller removes)
    assert set(root.children()) <= {"data", "rejects.parquet", "scratch"}
    return counts, read_data(data), pq.read_table(rejects)


def test_every_bad_kind_is_rejected_with_reason_and_counts_reconcile(ray_cluster, tmp_path):
    dup = GOOD[3]
    path = write_jsonl(tmp_path / "corpus.jsonl", GOOD + [dup], BAD_LINES.values())
    counts, data, rejects = run_ingest(tmp_path, path)

    expected = Counter({reason: 1 for reason in BAD_LINES} | {"duplicate": 1})
    assert counts["rejects_by_reason"] == dict(expected)
    assert counts["rows_in"] == len(GOOD) + 1 + len(BAD_LINES)
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_rejected"]
    assert data.num_rows == counts["rows_kept"] == len(GOOD)
    assert rejects.num_rows == counts["rows_rejected"]
    assert set(data["id"].to_pylist()).isdisjoint(rejects["id"].to_pylist())
    # positions: ids are line numbers in the (single) file; the duplicate is line 20 and points at line 3
    dup_row = rejects.filter(pa.compute.equal(rejects["reason"], "duplicate")).to_pylist()[0]
    assert dup_row["source_row"] == len(GOOD) and dup_row["detail"] == "duplicate of id 3"
    bad_utf8 = rejects.filter(pa.compute.equal(rejects["reason"], "invalid_utf8")).to_pylist()[0]
    assert "bad" in bad_utf8["raw_preview"] and bad_utf8["source_file"] == str(path)
    assert data.column_names[:4] == ["id", "instruction", "input", "output"]
    assert data.to_pylist()[1]["input"] == "ctx"


def test_ids_are_stable_across_reruns_and_positional_across_files(ray_cluster, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", GOOD[:10])
    write_jsonl(folder / "b.jsonl", GOOD[10:])
    first = run_ingest(tmp_path / "one", folder)[1]
    second = run_ingest(tmp_path / "two", folder)[1]
    assert first.equals(second)
    ids = first["id"].to_pylist()
    assert ids == list(range(10)) + [ROW_ID_FILE_STRIDE + i for i in range(10)]
    assert first["instruction"].to_pylist() == [r["instruction"] for r in GOOD]


def test_alpaca_json_list_parquet_sharegpt_and_a_uri(ray_cluster, tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps(GOOD[:5] + [{"instruction": "x", "output": 7}]))
    counts, data, rejects = run_ingest(tmp_path / "j", tmp_path / "alpaca.json")
    assert (counts["rows_kept"], rejects["reason"].to_pylist()) == (5, ["wrong_type"])

    table = pa.Table.from_pylist(
        [{**r, "category": "qa"} for r in GOOD[:4]]
        + [{"instruction": "p", "input": "", "output": "", "category": "qa"}]
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    counts, data, rejects = run_ingest(tmp_path / "p", tmp_path / "rows.parquet")
    assert counts["rows_kept"] == 4 and rejects["reason"].to_pylist() == ["empty_output"]
    assert json.loads(data["extra"][0].as_py()) == {"category": "qa"}

    share = [
        {
            "id": f"c{i}",
            "conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}],
        }
        for i, r in enumerate(GOOD[:3])
    ]
    share.append({"id": "multi", "conversations": share[0]["conversations"] * 2})
    (tmp_path / "share.json").write_text(json.dumps(share))
    counts, data, rejects = run_ingest(tmp_path / "s", tmp_path / "share.json")
    # a multi-turn conversation is one example, kept whole (its one-line view: first question, last answer)
    assert data["output"].to_pylist() == ["Answer 0", "Answer 1", "Answer 2", "Answer 0"] and rejects.num_rows == 0
    multi = json.loads(data["conversation"][3].as_py())
    assert [t["role"] for t in multi] == ["user", "assistant"] * 2
    assert json.loads(data["extra"][3].as_py())["id"] == "multi"

    uri = f"file://{write_jsonl(tmp_path / 'uri.jsonl', GOOD[:6])}"
    counts, data, _ = run_ingest(tmp_path / "u", uri)
    assert counts["rows_kept"] == 6 and data["source_file"][0].as_py() == uri


def test_limit_and_unreadable_inputs(ray_cluster, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", GOOD)
    counts, data, _ = run_ingest(tmp_path / "l", path, limit=7)
    assert counts["rows_in"] == 7 and data.num_rows == 7

    (tmp_path / "broken.json").write_text('[{"instruction": "x", "output": "y"}, {"oops"')
    with pytest.raises(SourceError, match="broken.json"):
        run_ingest(tmp_path / "b", tmp_path / "broken.json")
    with pytest.raises(SourceError, match="not found"):
        run_ingest(tmp_path / "m", tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="cannot tell the format"):
        run_ingest(tmp_path / "t", tmp_path / "notes.txt")


def test_conversations_read_alike_from_json_jsonl_gz_and_parquet(ray_cluster, tmp_path):
    """The 300 real glaive conversations and hand-written OpenAI `messages` as a JSON list, gzipped JSON Lines and
    Parquet (nested lists of structs): the same canonical rows from each, every row accounted for, and each kept row
    written back exactly as it came."""
    import gzip

    from test_data_conversations import GLAIVE

    from gradfilter_ray.data.formats import original_record

    records = json.loads(GLAIVE.read_text())[:60]
    messages = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                {"role": "assistant", "content": "4"},
            ]
        },
        {"messages": [{"role": "assistant", "content": "I speak first"}]},  # no user turn before it
    ]
    (tmp_path / "conv.json").write_text(json.dumps(records + messages))
    with gzip.open(tmp_path / "conv.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records + messages)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "glaive.parquet")
    results = {}
    for name in ("conv.json", "conv.jsonl.gz", "glaive.parquet"):
        counts, data, rejects = run_ingest(tmp_path / name.replace(".", "_"), tmp_path / name)
        assert counts["rows_in"] == counts["rows_kept"] + counts["rows_rejected"]
        results[name] = (data, rejects, counts)
    data, rejects, counts = results["conv.json"]
    assert counts["rows_in"] == 63 and rejects["reason"].to_pylist().count("roles_out_of_order") == 1
    assert results["conv.jsonl.gz"][0]["conversation"].to_pylist() == data["conversation"].to_pylist()
    assert results["conv.jsonl.gz"][1]["reason"].to_pylist() == rejects["reason"].to_pylist()
    parquet = results["glaive.parquet"][0]
    assert sorted(parquet["conversation"].to_pylist()) == sorted(
        c for c, fmt in zip(data["conversation"].to_pylist(), data["source_format"].to_pylist()) if fmt == "sharegpt"
    )
    for row in data.to_pylist():
        assert original_record(row) in records + messages  # written back in its own keys, unchanged
    assert any(len(json.loads(c)) > 2 for c in data["conversation"].to_pylist())  # multi-turn rows kept whole
