"""The bundled Cherry_LLM test sets and AlpacaEval reference answers load with their documented sizes."""

import json

import pytest

from gradfilter_ray.evaluation import testsets
from gradfilter_ray.evaluation.testsets import TEST_SETS, load_reference_answers, load_test_set

EXPECTED_SIZES = {"vicuna": 80, "koala": 180, "wizardlm": 218, "sinstruct": 252, "lima": 300}


@pytest.mark.parametrize("name", TEST_SETS)
def test_bundled_set_loads(name):
    rows = load_test_set(name)
    assert len(rows) == EXPECTED_SIZES[name]
    for row in rows:
        assert set(row) == {"id", "instruction", "input"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"].strip()
    assert len({row["id"] for row in rows}) == len(rows)


def test_known_rows_are_normalised():
    assert load_test_set("vicuna")[0] == {
        "id": "vicuna_1",
        "instruction": "How can I improve my time management skills?",
        "input": "",
    }
    assert load_test_set("koala")[0]["id"] == "koala_0"
    assert load_test_set("wizardlm")[0]["instruction"].startswith("If a car travels 120 miles")
    sinstruct = load_test_set("sinstruct")
    assert sinstruct[0]["input"].startswith("If you have any questions about my rate")
    assert sum(1 for row in sinstruct if row["input"]) == 208  # the rest have an empty instance input
    assert load_test_set("lima")[0]["id"] == "lima_0"


def test_lima_list_conversations_use_first_turn(tmp_path, monkeypatch):
    (tmp_path / "cherry_lima_test_set.jsonl").write_text(
        json.dumps({"conversations": ["first turn", "reply"]}) + "\n" + json.dumps({"conversations": "plain"}) + "\n"
    )
    monkeypatch.setattr(testsets, "EVAL_ASSETS", tmp_path)
    assert [row["instruction"] for row in load_test_set("lima")] == ["first turn", "plain"]


def test_reference_answers():
    rows = load_reference_answers()
    assert len(rows) == 805
    assert rows[0]["id"] == "alpaca_eval_0"
    assert len({row["id"] for row in rows}) == 805
    for row in rows:
        assert set(row) == {"id", "instruction", "input", "output"}
        assert row["instruction"].strip() and isinstance(row["output"], str) and row["input"] == ""
    # upstream text-davinci-003 gave an empty answer to two instructions; kept, so ids match AlpacaEval's order
    assert [row["id"] for row in rows if not row["output"].strip()] == ["alpaca_eval_247", "alpaca_eval_504"]


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"instruction": "Say hi", "input": "to Bob", "id": 7})
        + "\n\n"
        + json.dumps({"instruction": "Count to three"})
        + "\n"
    )
    expected = [
        {"id": "7", "instruction": "Say hi", "input": "to Bob"},
        {"id": "mine_1", "instruction": "Count to three", "input": ""},
    ]
    assert load_test_set(str(path)) == expected
    assert load_test_set(path) == expected


def test_user_jsonl_without_instruction_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "no instruction key"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_test_set(path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_test_set("mtbench")
    for name in TEST_SETS:
        assert name in str(info.value)
