"""Chat records -> canonical turns (data/conversations.py): real multi-turn ShareGPT with tool calls (glaive, 300
conversations), hand-written OpenAI `messages` (text parts, tool_calls, tool results), and every reason a
conversation is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradfilter_ray.bundled import resolve
from gradfilter_ray.data import conversations as C

# The shared material's glaive demo file, bundled with the package (gradfilter_ray/assets/README.md)
GLAIVE = Path(resolve("bundled:glaive_toolcall_en_demo.json"))


def test_every_real_glaive_conversation_is_kept_turn_for_turn():
    records = json.loads(GLAIVE.read_text())
    assert len(records) == 300
    roles_seen = set()
    for record in records:
        turns, fmt = C.canonical_turns(record)
        assert fmt == "sharegpt" and len(turns) == len(record["conversations"])
        for turn, raw in zip(turns, record["conversations"]):
            assert turn["content"] == raw["value"]  # the text, untouched
            assert (
                turn["role"]
                == {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool"}[
                    raw["from"]
                ]
            )
        roles_seen |= {t["role"] for t in turns}
    assert roles_seen == {"user", "assistant", "tool_call", "tool"}


def test_openai_messages_with_text_parts_tool_calls_and_tool_results():
    record = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": -3}'},
            {"role": "assistant", "content": "-3 °C."},
        ]
    }
    turns, fmt = C.canonical_turns(record)
    assert fmt == "openai_messages"
    assert turns == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "tool_call", "content": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"role": "tool", "content": '{"temp": -3}'},
        {"role": "assistant", "content": "-3 °C."},
    ]
    assert C.first_exchange(turns) == ("Weather in Oslo?", "-3 °C.")


def test_an_assistant_message_with_text_and_tool_calls_gives_an_answer_then_a_call():
    record = {
        "messages": [
            {"role": "user", "content": "Add 2 and 3, then say hi."},
            {
                "role": "assistant",
                "content": "Let me add.",
                "tool_calls": [
                    {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
                    {"function": {"name": "noop", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "5. Hi!"},
        ]
    }
    turns, _ = C.canonical_turns(record)
    assert [t["role"] for t in turns] == ["user", "assistant", "tool_call", "tool", "assistant"]
    assert json.loads(turns[2]["content"]) == [
        {"name": "add", "arguments": {"a": 2, "b": 3}},
        {"name": "noop", "arguments": "not json"},
    ]


def j(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.mark.parametrize(
    "record,reason",
    [
        (j(("human", "only a question")), C.NO_ASSISTANT_TURN),
        (j(("system", "s"), ("human", "q")), C.NO_ASSISTANT_TURN),
        (j(("human", "q"), ("wizard", "a")), C.UNKNOWN_ROLE),
        ({"messages": [{"role": 7, "content": "q"}]}, C.UNKNOWN_ROLE),
        (j(("gpt", "a"), ("human", "q")), C.ROLES_OUT_OF_ORDER),
        (j(("human", "q"), ("system", "s"), ("gpt", "a")), C.ROLES_OUT_OF_ORDER),
        (j(("human", "q"), ("human", "q2"), ("gpt", "a")), C.ROLES_OUT_OF_ORDER),
        (j(("human", "q"), ("observation", "{}"), ("gpt", "a")), C.ROLES_OUT_OF_ORDER),
        (j(("human", "q"), ("gpt", "  ")), C.EMPTY_TURN),
        (j(("human", ""), ("gpt", "a")), C.EMPTY_TURN),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, C.NOT_TEXT),
        ({"conversations": "human: q"}, C.NOT_TEXT),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, C.NOT_TEXT),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"oops": 1}]}]}, C.NOT_TEXT),
    ],
)
def test_every_unusable_conversation_gets_its_reason(record, reason):
    with pytest.raises(C.ConversationRejected) as err:
        C.canonical_turns(record)
    assert err.value.reason == reason and err.value.detail


def test_a_conversation_may_end_on_a_user_turn_and_keep_it():
    """Lossless: a trailing question with no answer stays in the conversation (it is simply never trained on)."""
    turns, _ = C.canonical_turns(j(("human", "q"), ("gpt", "a"), ("human", "and then?")))
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert C.first_exchange(turns) == ("q", "a")


def test_parquet_turns_with_both_key_pairs_take_the_one_that_is_set():
    """A Parquet file's turns carry every field of the file (from/value and role/content), the absent ones null."""
    turns = [
        {"from": None, "value": None, "role": "developer", "content": "Be brief."},
        {"from": "human", "value": "q", "role": None, "content": None},
        {"from": None, "value": None, "role": "assistant", "content": "a"},
    ]
    got, _ = C.canonical_turns({"conversations": turns})
    assert got == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_every_real_glaive_conversation_keeps_its_tools_in_the_form_templates_take():
    with_tools = 0
    for record in json.loads(GLAIVE.read_text()):
        tools, listed = C.canonical_tools(record), json.loads(record["tools"])  # ShareGPT: the functions as JSON text
        assert (tools is None) == (listed == [])  # "[]": none
        if tools:
            assert [t["function"] for t in tools] == listed
            assert all(t["type"] == "function" and t["function"]["name"] for t in tools)
            with_tools += 1
    assert with_tools == 191


ADD = {"name": "add", "description": "a + b", "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}}
NO_PARAMETERS = {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    "tools, functions",
    [
        ([{"type": "function", "function": ADD}], [ADD]),  # OpenAI Chat: wrapped
        ([{"type": "function", **ADD}], [ADD]),  # OpenAI Responses: flat
        (json.dumps([ADD]), [ADD]),  # ShareGPT: JSON text
        ({"name": "mul"}, [{"name": "mul", "description": "", "parameters": NO_PARAMETERS}]),  # one, alone
        ([{"name": "now", "description": "t"}], [{"name": "now", "description": "t", "parameters": NO_PARAMETERS}]),
        (None, None),
        ("", None),
        ("[]", None),
        ([], None),
    ],
)
def test_tools_from_openai_sharegpt_or_none(tools, functions):
    """Every function in the form templates take, description and parameters filled (a template writes them
    unconditionally: an undefined one would fail the rendering)."""
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": tools}
    got = C.canonical_tools(record)
    assert (None if got is None else [t["function"] for t in got]) == functions
    assert got is None or all(t["type"] == "function" for t in got)


@pytest.mark.parametrize(
    "tools",
    [
        "[{not json",
        5,
        [{"description": "no name"}],
        [3],
        [{"type": "function", "function": "add"}],
        [{"name": "add", "parameters": "a, b"}],
    ],
)
def test_unusable_tools_are_refused_with_their_reason(tools):
    with pytest.raises(C.ConversationRejected) as err:
        C.canonical_tools({"conversations": [], "tools": tools})
    assert err.value.reason == C.BAD_TOOLS and err.value.detail
