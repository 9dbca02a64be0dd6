"""Pure ingest core: every way a raw row can be bad maps to its reason; good rows come out canonical."""

import json

import pyarrow as pa
import pytest

from gradfilter_ray.data import formats as F


def raw_table(raws):
    return pa.Table.from_pydict(
        {
            "id": list(range(len(raws))),
            "source_file": ["f"] * len(raws),
            "source_row": list(range(len(raws))),
            "raw": raws,
        },
        schema=F.RAW_SCHEMA,
    )


def j(obj):
    return json.dumps(obj).encode()


CASES = [
    (j({"instruction": "Say hi", "input": "", "output": "hi"}), None),
    (j({"instruction": "Say hi", "output": "hi"}), None),  # missing input is fine
    (j({"instruction": "Say hi", "input": None, "output": "hi"}), None),
    (b'{"instruction": "x", "output": ', F.INVALID_JSON),
    (b'{"instruction": "caf\xe9", "output": "x"}', F.INVALID_UTF8),
    (j(["a", "list"]), F.NOT_AN_OBJECT),
    (j("a string"), F.NOT_AN_OBJECT),
    (j({"input": "", "output": "x"}), F.MISSING_INSTRUCTION),
    (j({"instruction": "  ", "output": "x"}), F.EMPTY_INSTRUCTION),
    (j({"instruction": "x"}), F.MISSING_OUTPUT),
    (j({"instruction": "x", "output": None}), F.MISSING_OUTPUT),
    (j({"instruction": "x", "output": ""}), F.EMPTY_OUTPUT),
    (j({"instruction": "x", "output": 42}), F.WRONG_TYPE),
    (j({"instruction": ["x"], "output": "y"}), F.WRONG_TYPE),
    (j({"instruction": "x", "input": {"nested": [1, 2]}, "output": "y"}), F.WRONG_TYPE),
    (j({"instruction": "x", "output": "y" * 101}), F.FIELD_TOO_LONG),
    (b'{"instruction": "x\\ud800", "output": "y"}', F.INVALID_UTF8),  # an escaped lone surrogate
]


@pytest.mark.parametrize("raw, reason", CASES)
def test_each_raw_row_is_kept_or_rejected_with_its_reason(raw, reason):
    out = F.normalize_batch(raw_table([raw]), max_chars=100).to_pylist()[0]
    assert out["reason"] == reason
    if reason is None:
        assert out["instruction"] == "Say hi" and out["output"] == "hi" and out["input"] == ""
        assert out["raw_preview"] is None and len(out["content_hash"]) == 16
    else:
        assert out["instruction"] is None and out["raw_preview"]


def test_batch_keeps_every_row_and_its_position():
    table = F.normalize_batch(raw_table([r for r, _ in CASES]), max_chars=100)
    assert table.num_rows == len(CASES)
    assert table["id"].to_pylist() == list(range(len(CASES)))
    assert table["reason"].to_pylist() == [reason for _, reason in CASES]


def test_extra_keys_are_kept_and_the_record_rebuilds():
    rec = {"instruction": "Classify", "input": "text", "output": "A", "category": "classification", "n": 3}
    out = F.normalize_batch(raw_table([j(rec)]), max_chars=100).to_pylist()[0]
    assert json.loads(out["extra"]) == {"category": "classification", "n": 3}
    assert F.original_record(out) == rec


def test_sharegpt_single_turn():
    rec = {
        "id": "abc",
        "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
        ],
    }
    out = F.normalize_batch(raw_table([j(rec)]), max_chars=100).to_pylist()[0]
    assert (out["reason"], out["instruction"], out["input"], out["output"]) == (None, "What is 2+2?", "", "4")
    assert out["source_format"] == "sharegpt"
    assert F.original_record(out) == rec
    role_content = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert F.normalize_batch(raw_table([j(role_content)]), 100).to_pylist()[0]["output"] == "a"


@pytest.mark.parametrize(
    "conversations, reason",
    [
        ([{"from": "human", "value": "q"}], "no_assistant_turn"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "roles_out_of_order"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}], "empty_turn"),
        ([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], "not_text"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a" * 101}], F.FIELD_TOO_LONG),
        ("not a list", "not_text"),
    ],
)
def test_sharegpt_rejections(conversations, reason):
    out = F.normalize_batch(raw_table([j({"conversations": conversations})]), 100).to_pylist()[0]
    assert out["reason"] == reason


def test_duplicates_share_a_content_hash_and_near_duplicates_do_not():
    a = F.content_hash("i", "x", "o")
    assert a == F.content_hash("i", "x", "o")
    assert a != F.content_hash("i", "", "xo") and a != F.content_hash("i", "x", "o ")


def test_tools_are_kept_as_json_and_make_a_conversation_its_own_example():
    turns = [{"from": "human", "value": "Add 2 and 3"}, {"from": "function_call", "value": '{"name": "add"}'}]
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    bare = {"conversations": turns}
    out = F.normalize_batch(raw_table([j({**bare, "tools": json.dumps(tools)}), j(bare)]), 1000).to_pylist()
    assert out[0]["reason"] is None and json.loads(out[0]["tools"]) == [
        {"type": "function", "function": {**tools[0], "description": ""}}
    ]
    assert out[1]["tools"] is None and out[0]["content_hash"] != out[1]["content_hash"]
    bad = F.normalize_batch(raw_table([j({**bare, "tools": "[{oops"})]), 1000).to_pylist()[0]
    assert bad["reason"] == "bad_tools" and bad["tools"] is None


def test_a_question_and_answer_is_the_alpaca_example_unless_a_system_prompt_or_tools_come_with_it():
    qa = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]
    records = [
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"conversations": qa},
        {"conversations": [{"from": "system", "value": "Answer in French."}, *qa]},
        {"conversations": qa, "tools": [{"name": "calculator"}]},
    ]
    hashes = [r["content_hash"] for r in F.normalize_batch(raw_table([j(r) for r in records]), 1000).to_pylist()]
    assert hashes[0] == hashes[1] and len({hashes[1], hashes[2], hashes[3]}) == 3
