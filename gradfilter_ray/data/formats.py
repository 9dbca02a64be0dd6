"""Pure core of ingest: raw records -> canonical rows, or a rejection with a reason.

Every raw row arrives as bytes holding one JSON value (a JSON Lines line, one element of an Alpaca JSON list, or a
Parquet row serialised to JSON) together with its id and its position in the source. `normalize_batch` turns a
batch of those into one Arrow table in which each row is either canonical (``reason`` null) or rejected (``reason``
set, ``detail`` saying why, ``raw_preview`` holding the start of the original text).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from gradfilter_ray.data.conversations import (
    CONVERSATION_REASONS,
    SYSTEM,
    ConversationRejected,
    canonical_tools,
    canonical_turns,
    first_exchange,
    is_conversation,
)

ROW_ID_FILE_STRIDE = 1 << 40  # id = file_index * stride + row position in that file: stable across re-runs

# Rejection reasons (the `reason` column); one name per way a row can be unusable.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_INSTRUCTION = "missing_instruction"
EMPTY_INSTRUCTION = "empty_instruction"
MISSING_OUTPUT = "missing_output"
EMPTY_OUTPUT = "empty_output"
WRONG_TYPE = "wrong_type"
FIELD_TOO_LONG = "field_too_long"
DUPLICATE = "duplicate"

REASONS = (
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_INSTRUCTION,
    EMPTY_INSTRUCTION,
    MISSING_OUTPUT,
    EMPTY_OUTPUT,
    WRONG_TYPE,
    FIELD_TOO_LONG,
    *CONVERSATION_REASONS,
    DUPLICATE,
)

PREVIEW_CHARS = 2000

RAW_SCHEMA = pa.schema(
    [("id", pa.int64()), ("source_file", pa.string()), ("source_row", pa.int64()), ("raw", pa.large_binary())]
)

NORMALIZED_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("conversation", pa.string()),
        ("tools", pa.string()),
        ("extra", pa.string()),
        ("source_format", pa.string()),
        ("content_hash", pa.binary(16)),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw_preview", pa.string()),
    ]
)

# `conversation`: a chat record's canonical turns as JSON (data/conversations.py), null for Alpaca rows; its
# instruction and output then show the first question and the last answer. `tools`: the functions the conversation
# may call, as JSON in the form chat templates take, null when it lists none.
CANONICAL_COLUMNS = [
    "id", "instruction", "input", "output", "conversation", "tools", "extra", "source_format", "source_file",
    "source_row",
]  # fmt: skip
REJECT_COLUMNS = ["id", "source_file", "source_row", "reason", "detail", "raw_preview"]
# What `normalize_record` fills (null on a rejected row): every column but the row's place and its rejection.
RECORD_FIELDS = [name for name in NORMALIZED_SCHEMA.names if name not in REJECT_COLUMNS]


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def content_hash(instruction: str, input_: str, output: str) -> bytes:
    """128-bit hash of the three canonical fields; exact duplicates share it."""
    payload = json.dumps([instruction, input_, output], ensure_ascii=False).encode("utf-8")
    return hashlib.blake2b(payload, digest_size=16).digest()


def null_constant(name: str) -> None:
    """NaN, Infinity and -Infinity are not JSON (Python's json reads them): read them as null, so that no
    non-standard constant reaches `extra` and, from there, the selections' JSON Lines."""
    return None


def decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(INVALID_UTF8, f"byte {exc.start}: {exc.reason}") from None
    try:
        return json.loads(text, parse_constant=null_constant)
    except json.JSONDecodeError as exc:
        raise Rejected(INVALID_JSON, f"line {exc.lineno} col {exc.colno}: {exc.msg}") from None
    except RecursionError:  # json's parser recurses per nesting level: a deep enough value would crash the stage
        raise Rejected(INVALID_JSON, "nested too deeply") from None


def _has_surrogates(text: str) -> bool:
    # Undecodable bytes (kept by surrogateescape) and JSON-escaped lone surrogates cannot be stored as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text_field(record: dict, key: str, *, required: bool, max_chars: int) -> str:
    if key not in record or record[key] is None:
        if required:
            raise Rejected(MISSING_OUTPUT if key == "output" else MISSING_INSTRUCTION, key)
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise Rejected(WRONG_TYPE, f"{key}: expected a string, got {type(value).__name__}")
    if _has_surrogates(value):
        raise Rejected(INVALID_UTF8, key)
    if len(value) > max_chars:
        raise Rejected(FIELD_TOO_LONG, f"{key}: {len(value)} chars > {max_chars}")
    if required and not value.strip():
        raise Rejected(EMPTY_OUTPUT if key == "output" else EMPTY_INSTRUCTION, key)
    return value


def _conversation(record: dict, max_chars: int) -> tuple[list[dict[str, str]], list[dict] | None, str]:
    try:
        turns, source_format = canonical_turns(record)
        tools = canonical_tools(record)
    except ConversationRejected as rej:
        raise Rejected(rej.reason, rej.detail) from None
    for i, turn in enumerate(turns):
        _text_field({f"turn {i}": turn["content"]}, f"turn {i}", required=False, max_chars=max_chars)  # length, UTF-8
    return turns, tools, source_format


def is_single_exchange(turns: list[dict[str, str]]) -> bool:
    """One question and one answer (a system turn aside): the rows an Alpaca prompt can express, tokenised under it
    exactly as before conversations were read (same fields, same tokens; the same hash without a system turn or
    tools)."""
    return [t["role"] for t in turns if t["role"] != SYSTEM] == ["user", "assistant"]


def normalize_record(record: Any, max_chars: int) -> dict[str, Any]:
    """One decoded JSON value -> canonical fields, or raise `Rejected`."""
    if not isinstance(record, dict):
        raise Rejected(NOT_AN_OBJECT, f"got {type(record).__name__}")
    conversation, tools, turns = None, None, None
    if is_conversation(record):
        turns, tool_list, source_format = _conversation(record, max_chars)
        instruction, output = first_exchange(turns)
        input_ = ""
        conversation = json.dumps(turns, ensure_ascii=False)
        tools = json.dumps(tool_list, ensure_ascii=False) if tool_list else None  # their own key order: as shown
        if tools is not None and _has_surrogates(tools):  # JSON text can escape what UTF-8 cannot store
            raise Rejected(INVALID_UTF8, "tools")
        extra = dict(record)  # the whole record: a selection is written back in its own keys
    else:
        instruction = _text_field(record, "instruction", required=True, max_chars=max_chars)
        input_ = _text_field(record, "input", required=False, max_chars=max_chars)
        output = _text_field(record, "output", required=True, max_chars=max_chars)
        extra = {k: v for k, v in record.items() if k not in ("instruction", "input", "output")}
        source_format = "alpaca"
    try:
        extra_json = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise Rejected(WRONG_TYPE, f"extra fields not representable: {exc}") from None
    except RecursionError:
        raise Rejected(INVALID_JSON, "extra fields nested too deeply") from None
    if _has_surrogates(extra_json):
        raise Rejected(INVALID_UTF8, "extra fields")
    if len(extra_json) > max_chars * 4:
        raise Rejected(FIELD_TOO_LONG, f"extra fields: {len(extra_json)} chars")
    # An Alpaca row and a bare question-and-answer conversation are the same example when their three fields are;
    # anything else (more turns, a system prompt, tools) is the same example only if all of it is the same.
    plain = turns is None or (is_single_exchange(turns) and turns[0]["role"] != SYSTEM and tools is None)
    return {
        "instruction": instruction,
        "input": input_,
        "output": output,
        "conversation": conversation,
        "tools": tools,
        "extra": extra_json,
        "source_format": source_format,
        "content_hash": content_hash(instruction, input_, output)
        if plain
        else content_hash(conversation, tools or "", ""),
    }


def _preview(raw: bytes) -> str:
    return raw[: PREVIEW_CHARS * 4].decode("utf-8", "replace")[:PREVIEW_CHARS]


def normalize_batch(batch: pa.Table, max_chars: int) -> pa.Table:
    """[N] raw rows (RAW_SCHEMA) -> [N] rows of NORMALIZED_SCHEMA; rows are never dropped here."""
    out: dict[str, list] = {name: [] for name in NORMALIZED_SCHEMA.names}
    columns = batch.to_pydict()
    for rid, src, pos, raw in zip(columns["id"], columns["source_file"], columns["source_row"], columns["raw"]):
        out["id"].append(rid)
        out["source_file"].append(src)
        out["source_row"].append(pos)
        try:
            fields = normalize_record(decode_json(raw), max_chars)
        except Rejected as rej:
            for key in RECORD_FIELDS:
                out[key].append(None)
            out["reason"].append(rej.reason)
            out["detail"].append(rej.detail)
            out["raw_preview"].append(_preview(raw))
            continue
        for key, value in fields.items():
            out[key].append(value)
        out["reason"].append(None)
        out["detail"].append(None)
        out["raw_preview"].append(None)
    return pa.Table.from_pydict(out, schema=NORMALIZED_SCHEMA)


def original_record(row: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a record in the input's own keys from a canonical row (for selection outputs)."""
    extra = json.loads(row["extra"]) if row.get("extra") else {}
    if row.get("conversation") or row.get("source_format") == "sharegpt":
        return extra
    return {"instruction": row["instruction"], "input": row["input"], "output": row["output"], **extra}
