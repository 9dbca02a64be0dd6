"""Pure core: chat records (ShareGPT `conversations`, OpenAI `messages`) -> one canonical list of turns, or a
rejection with a reason.

A conversation is one example. Its canonical form is a list of turns ``{"role": ..., "content": ...}`` with five
roles: ``system`` (only first), ``user``, ``assistant``, ``tool_call`` (the assistant calling a tool: trained on
like an answer, configurably) and ``tool`` (what the tool returned: context, never trained on). Content is text.
The original record is kept whole in the canonical row's `extra`, so a selection is written back in the input's own
format, losslessly.

Order rules (anything else is `roles_out_of_order`): a system turn only at the start; then a user turn; an
assistant or tool_call turn answers a user or tool turn (or follows its own tool_call, as OpenAI's assistant message
with both text and tool calls does); a tool turn follows a tool_call or another tool turn; a user turn follows an
assistant or tool turn. At least one assistant or tool_call turn (`no_assistant_turn`).

A conversation's `tools` (the functions it may call) are kept beside its turns in the form chat templates take;
tools that are not JSON, not a list of functions, or a function without a name or with parameters that are not an
object are `bad_tools`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

# Reasons a conversation is unusable (also in formats.REASONS).
NO_ASSISTANT_TURN = "no_assistant_turn"
UNKNOWN_ROLE = "unknown_role"
ROLES_OUT_OF_ORDER = "roles_out_of_order"
EMPTY_TURN = "empty_turn"
NOT_TEXT = "not_text"
BAD_TOOLS = "bad_tools"
CONVERSATION_REASONS = (NO_ASSISTANT_TURN, UNKNOWN_ROLE, ROLES_OUT_OF_ORDER, EMPTY_TURN, NOT_TEXT, BAD_TOOLS)

SYSTEM, USER, ASSISTANT, TOOL_CALL, TOOL = "system", "user", "assistant", "tool_call", "tool"
ANSWERS = (ASSISTANT, TOOL_CALL)  # the turns a model is trained to produce

# ShareGPT's `from` and OpenAI's `role`, lower-cased, to a canonical role.
ROLE_NAMES = {
    "system": SYSTEM,
    "developer": SYSTEM,  # OpenAI's newer name for the system message
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bard": ASSISTANT,
    "model": ASSISTANT,
    "function_call": TOOL_CALL,
    "tool_call": TOOL_CALL,
    "observation": TOOL,
    "tool": TOOL,
    "function": TOOL,
}

# Which roles may come right before each role (None: the conversation's start).
MAY_FOLLOW = {
    SYSTEM: {None},
    USER: {None, SYSTEM, ASSISTANT, TOOL},
    ASSISTANT: {USER, TOOL, TOOL_CALL},
    TOOL_CALL: {USER, TOOL, ASSISTANT, TOOL_CALL},
    TOOL: {TOOL_CALL, TOOL},
}


class ConversationRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _text(content: Any, where: str) -> str:
    """A turn's content as text: a string, or OpenAI's list of parts whose parts are all text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ConversationRejected(NOT_TEXT, f"{where}.content[{k}]: a {kind} part, not text")
        return "".join(texts)
    raise ConversationRejected(NOT_TEXT, f"{where}.content: a {type(content).__name__}, not text")


def _role(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ConversationRejected(UNKNOWN_ROLE, f"{where}: role {name!r}")
    role = ROLE_NAMES.get(name.strip().lower())
    if role is None:
        raise ConversationRejected(UNKNOWN_ROLE, f"{where}: role {name!r} (known: {sorted(ROLE_NAMES)})")
    return role


def _objects(value: Any, key: str) -> Iterator[tuple[str, dict]]:
    """(where, turn object) for each element of a record's list of turns, or the reason it is not one."""
    if not isinstance(value, list):
        raise ConversationRejected(NOT_TEXT, f"{key}: expected a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConversationRejected(NOT_TEXT, f"{key}[{i}]: expected an object")
        yield f"{key}[{i}]", item


def sharegpt_turns(turns: Any) -> list[dict[str, str]]:
    """ShareGPT `conversations` ([{from, value}], also {role, content}) -> canonical turns (unchecked order)."""
    out = []
    for where, turn in _objects(turns, "conversations"):
        # Parquet gives every turn every field its file has, the absent ones null: take the one that is set
        role = _role(_first_set(turn, "from", "role"), where)
        out.append({"role": role, "content": _text(_first_set(turn, "value", "content"), where)})
    return out


def _first_set(turn: dict, *keys: str):
    return next((turn[k] for k in keys if turn.get(k) is not None), None)


def openai_turns(messages: Any) -> list[dict[str, str]]:
    """OpenAI `messages` -> canonical turns (unchecked order). An assistant message's `tool_calls` become one
    tool_call turn holding them as JSON ({name, arguments} each), after its text if it has any."""
    out = []
    for where, message in _objects(messages, "messages"):
        role = _role(message.get("role"), where)
        calls = message.get("tool_calls") if role == ASSISTANT else None
        content = message.get("content")
        if calls:
            if content not in (None, "", []):
                out.append({"role": ASSISTANT, "content": _text(content, where)})
            out.append({"role": TOOL_CALL, "content": _tool_calls_text(calls, where)})
            continue
        out.append({"role": role, "content": _text(content, where)})
    return out


def _tool_calls_text(calls: Any, where: str) -> str:
    if not isinstance(calls, list):
        raise ConversationRejected(NOT_TEXT, f"{where}.tool_calls: expected a list")
    shown = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ConversationRejected(
                NOT_TEXT, f"{where}.tool_calls[{k}]: expected {{function: {{name, arguments}}}}"
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string: keep its object when it is one
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        shown.append({"name": function["name"], "arguments": arguments})
    return json.dumps(shown[0] if len(shown) == 1 else shown, ensure_ascii=False)


def check_turns(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns if they form a usable conversation (module docstring), else raise ConversationRejected."""
    previous = None
    for i, turn in enumerate(turns):
        if not turn["content"].strip():
            raise ConversationRejected(EMPTY_TURN, f"turn {i} ({turn['role']}) is empty")
        if previous not in MAY_FOLLOW[turn["role"]]:
            after = "the start" if previous is None else previous
            raise ConversationRejected(ROLES_OUT_OF_ORDER, f"turn {i}: {turn['role']} after {after}")
        previous = turn["role"]
    if not any(t["role"] in ANSWERS for t in turns):
        raise ConversationRejected(NO_ASSISTANT_TURN, f"roles {[t['role'] for t in turns]}")
    return turns


def canonical_turns(record: dict) -> tuple[list[dict[str, str]], str]:
    """(checked canonical turns, source format) of a chat record: ShareGPT when it has `conversations`, OpenAI
    when it has `messages`."""
    if "conversations" in record:
        return check_turns(sharegpt_turns(record["conversations"])), "sharegpt"
    return check_turns(openai_turns(record["messages"])), "openai_messages"


def canonical_tools(record: dict) -> list[dict] | None:
    """The functions a conversation may call (`tools`: a list, or ShareGPT's JSON text of one), each in the form chat
    templates take (``{"type": "function", "function": {"name", "description", "parameters"}}``); None when it lists
    none. Without them a tool call is trained with no definition of the function it calls in its context."""
    value = record.get("tools")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConversationRejected(BAD_TOOLS, f"tools: not JSON ({exc.msg})") from None
    if value is None:
        return None
    if isinstance(value, dict):  # one function given alone
        value = [value]
    if not isinstance(value, list):
        raise ConversationRejected(BAD_TOOLS, f"tools: expected a list, got {type(value).__name__}")
    return [_function(tool, k) for k, tool in enumerate(value)] or None


def _function(tool: Any, k: int) -> dict:
    """One tool as `{"type": "function", "function": {name, description, parameters, ...}}`: OpenAI's Chat API wraps
    the function so already, ShareGPT and OpenAI's Responses API list it flat. Description and parameters are filled
    when absent (templates write them unconditionally; an undefined one fails the rendering)."""
    inner = tool.get("function") if isinstance(tool, dict) else None
    if isinstance(inner, dict):
        function = dict(inner)
    elif isinstance(tool, dict):
        function = {key: v for key, v in tool.items() if key != "type"}
    else:
        raise ConversationRejected(BAD_TOOLS, f"tools[{k}]: expected an object, got {type(tool).__name__}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConversationRejected(BAD_TOOLS, f"tools[{k}]: expected a function with a name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ConversationRejected(BAD_TOOLS, f"tools[{k}] ({name}): parameters must be an object")
    function.setdefault("description", "")
    function["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def is_conversation(record: dict) -> bool:
    return "conversations" in record or "messages" in record


def first_exchange(turns: list[dict[str, str]]) -> tuple[str, str]:
    """(the first user turn, the last answer): what a one-line view of the conversation shows (report, judge)."""
    user = next((t["content"] for t in turns if t["role"] == USER), "")
    answer = next(t["content"] for t in reversed(turns) if t["role"] in ANSWERS)
    return user, answer
