"""The pairwise-evaluation test sets of Cherry_LLM / Superfiltering, and AlpacaEval reference answers.

Each bundled file keeps its upstream keys (see gradfilter_ray/assets/README.md); this module normalises every row to
`{"id", "instruction", "input"}` so the generation and judging code never needs to know which set it is reading.
Paths are resolved relative to the package, as gradfilter_ray/models.py does for `bundled:` assets, so nothing
here needs the network or an installed copy of the upstream repos.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVAL_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"
TEST_SETS = ("vicuna", "koala", "wizardlm", "sinstruct", "lima")
REFERENCE_ANSWERS_FILE = "alpaca_eval_805_text_davinci_003_outputs.json"


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _first_turn(conversations: Any) -> str:
    # LIMA's test file stores a bare string; other LIMA dumps store the dialogue as a list of turns.
    if isinstance(conversations, str):
        return conversations
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], str):
        return conversations[0]
    raise ValueError(f"unsupported LIMA 'conversations' value: {type(conversations).__name__}")


def _normalise(name: str, i: int, raw: dict[str, Any]) -> dict[str, str]:
    """One upstream row -> {"id", "instruction", "input"}. Integer upstream ids get the set name as a prefix
    so that ids stay unique when several sets are pooled."""
    if name == "vicuna":
        return {"id": f"vicuna_{raw['question_id']}", "instruction": raw["text"], "input": ""}
    if name == "koala":
        return {"id": str(raw["id"]), "instruction": raw["prompt"], "input": ""}
    if name == "wizardlm":
        return {"id": f"wizardlm_{raw['idx']}", "instruction": raw["Instruction"], "input": ""}
    if name == "sinstruct":
        instances = raw.get("instances") or [{}]
        return {"id": str(raw["id"]), "instruction": raw["instruction"], "input": instances[0].get("input") or ""}
    if name == "lima":
        return {"id": f"lima_{i}", "instruction": _first_turn(raw["conversations"]), "input": ""}
    raise AssertionError(name)  # callers check the name first


def _load_user_file(path: Path) -> list[dict[str, str]]:
    rows = []
    for i, (lineno, raw) in enumerate(_read_jsonl(path)):
        instruction = raw.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{path}:{lineno}: needs a non-empty string 'instruction'")
        rows.append(
            {
                "id": str(raw.get("id", f"{path.stem}_{i}")),
                "instruction": instruction,
                "input": str(raw.get("input") or ""),
            }
        )
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids are not unique")
    return rows


def load_test_set(name: str | Path) -> list[dict[str, str]]:
    """Rows `{"id": str, "instruction": str, "input": str}` of a bundled test set, or of a user's JSONL file.

    `name` is one of TEST_SETS, or a path to an existing JSONL file whose lines carry `instruction` and optionally
    `input` and `id` (default id: "<file stem>_<row index>").
    """
    if str(name) in TEST_SETS:
        key = str(name)
        path = EVAL_ASSETS / f"cherry_{key}_test_set.jsonl"
        return [_normalise(key, i, raw) for i, (_, raw) in enumerate(_read_jsonl(path))]
    path = Path(name)
    if path.is_file():
        return _load_user_file(path)
    raise ValueError(f"unknown test set {str(name)!r}: use one of {', '.join(TEST_SETS)}, or a path to a JSONL file")


def load_reference_answers() -> list[dict[str, str]]:
    """The 805 AlpacaEval instructions with text-davinci-003 outputs, as
    `{"id": "alpaca_eval_{i}", "instruction", "input": "", "output"}` (reference answers for held-out loss).

    All 805 rows are kept in upstream order, including the two whose output is empty (alpaca_eval_247 and
    alpaca_eval_504); a held-out loss over answer tokens simply gets no tokens from them.
    """
    with open(EVAL_ASSETS / REFERENCE_ANSWERS_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return [
        {"id": f"alpaca_eval_{i}", "instruction": row["instruction"], "input": "", "output": row["output"]}
        for i, row in enumerate(data)
    ]
