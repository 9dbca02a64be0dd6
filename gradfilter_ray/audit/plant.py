"""Planted noise (pure: numpy and Arrow, no Ray, no I/O): corrupt a seeded share of a sample of kept rows.

Three kinds of damage that real instruction data suffers from, each applied to a row's answer (for a conversation,
its last assistant turn; tool calls and tool results are left alone):

- ``swap``: the answer of another sampled row (fluent, but answers a different instruction);
- ``truncate``: the answer cut to its first 10-50% of words (at least one word, always fewer than before);
- ``shuffle``: the answer's words in a random order (the same words, no longer a sentence).

Every planted row keeps its id (the id of the row it was made from) and says what was done to it: ``planted_kind``
(null on clean rows) and, for a swap, ``donor_id`` (the row whose answer it took). Everything is a function of the
sample and the seed, so an audit is reproducible.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from gradfilter_ray.data.conversations import ASSISTANT, first_exchange

SWAP, TRUNCATE, SHUFFLE = "swap", "truncate", "shuffle"
KINDS = (SWAP, TRUNCATE, SHUFFLE)
# Bumped when planting changes what it writes: the audit's planted data (and all of the audit) is then made again.
PLANT_VERSION = 1
TRUNCATE_KEEP = (0.1, 0.5)  # share of the answer's words a truncated answer keeps, drawn uniformly
PLANT_COLUMNS = [("planted_kind", pa.string()), ("donor_id", pa.int64()), ("planted_visible", pa.bool_())]

_WORD_SPLIT = re.compile(r"(\s+)")


def words(text: str) -> list[str]:
    return text.split()


def truncate_text(text: str, rng: np.random.Generator) -> str:
    """The first 10-50% of the answer's words, with the answer's own spacing; at least one, fewer than all."""
    pieces = _WORD_SPLIT.split(text.strip())  # word, space, word, ...
    n = (len(pieces) + 1) // 2
    if n < 2:
        raise ValueError("an answer of fewer than two words cannot be truncated")
    keep = min(n - 1, max(1, int(np.ceil(rng.uniform(*TRUNCATE_KEEP) * n))))
    return "".join(pieces[: 2 * keep - 1])


def shuffle_text(text: str, rng: np.random.Generator) -> str:
    """The answer's words in a random order other than their own, joined by single spaces."""
    tokens = words(text)
    if len(set(tokens)) < 2:
        raise ValueError("an answer without two distinct words cannot be shuffled")
    while True:
        shuffled = [tokens[i] for i in rng.permutation(len(tokens))]
        if shuffled != tokens:
            return " ".join(shuffled)


def last_assistant_turn(turns: list[dict]) -> int | None:
    """Index of a conversation's last assistant turn (tool calls are not answers to corrupt), None if it has none."""
    for i in range(len(turns) - 1, -1, -1):
        if turns[i].get("role") == ASSISTANT:
            return i
    return None


def answer_of(row: dict) -> str | None:
    """The text a corruption replaces: the Alpaca output, or a conversation's last assistant turn."""
    if row.get("conversation"):
        turns = json.loads(row["conversation"])
        at = last_assistant_turn(turns)
        return None if at is None else turns[at]["content"]
    return row.get("output")


def with_answer(row: dict, answer: str) -> dict:
    """The row with its answer replaced; a conversation's `output` (its last answer) is derived again."""
    row = dict(row)
    if row.get("conversation"):
        turns = json.loads(row["conversation"])
        at = last_assistant_turn(turns)
        turns[at] = {**turns[at], "content": answer}
        row["conversation"] = json.dumps(turns, ensure_ascii=False)
        row["output"] = first_exchange(turns)[1]
    else:
        row["output"] = answer
    return row


def plantable(answer: str | None) -> bool:
    """Every kind can be applied: at least two distinct words (a one-word answer cannot be cut or shuffled)."""
    return answer is not None and len(set(words(answer))) >= 2


def plan_planting(
    ids: np.ndarray, can_plant: np.ndarray, fraction: float, kinds: list[str], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are planted and how: (kind per row, object [N], None = clean; donor position per row, -1 = none).

    round(fraction * N) rows are drawn (seeded) among the plantable ones and given the kinds in turn, so the kinds
    get equal shares (up to one row). A swap takes the answer of a clean sampled row, each donor used once where
    there are enough of them. Raises if fewer rows can be planted than asked for."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    want = int(round(fraction * n))
    pool = np.flatnonzero(can_plant)
    if want > len(pool):
        raise ValueError(f"asked to plant {want} of {n} rows, but only {len(pool)} have an answer of two words")
    rng = np.random.default_rng([seed, 0x5EED])
    chosen = np.sort(rng.choice(pool, size=want, replace=False))
    kind = np.full(n, None, dtype=object)
    order = rng.permutation(want)  # which chosen row gets which kind: in turn over a shuffled order
    for rank, pos in enumerate(chosen[order]):
        kind[pos] = kinds[rank % len(kinds)]
    donor = np.full(n, -1, dtype=np.int64)
    swapped = np.flatnonzero(np.equal(kind, SWAP))
    clean = np.flatnonzero(np.equal(kind, None) & can_plant)  # a donor must have an answer to give
    if len(swapped):
        if not len(clean):
            raise ValueError("a swap needs a clean row to take an answer from")
        donor[swapped] = rng.choice(clean, size=len(swapped), replace=len(swapped) > len(clean))
    return kind, donor


def plant(table: pa.Table, fraction: float, kinds: list[str], seed: int) -> tuple[pa.Table, dict]:
    """Rows of `data/` (the audit's sample) -> the same rows, some corrupted, with `planted_kind` and `donor_id`.

    Returns the table and counts (rows, planted per kind, rows that could not be planted)."""
    rows = table.to_pylist()
    answers = [answer_of(r) for r in rows]
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    can_plant = np.array([plantable(a) for a in answers], dtype=bool)
    kind, donor = plan_planting(ids, can_plant, fraction, kinds, seed)
    out = []
    for i, row in enumerate(rows):
        k = kind[i]
        rng = np.random.default_rng([seed, int(ids[i]) & 0x7FFFFFFFFFFFFFFF, 1])
        if k is None:
            out.append({**row, "planted_kind": None, "donor_id": None, "planted_visible": None})
            continue
        if k == SWAP:
            new = answers[donor[i]]
            if new == answers[i]:  # the same answer twice in a sample: a swap would plant nothing
                new = shuffle_text(answers[i], rng)
                k = SHUFFLE
        elif k == TRUNCATE:
            new = truncate_text(answers[i], rng)
        else:
            new = shuffle_text(answers[i], rng)
        donor_id = int(ids[donor[i]]) if k == SWAP else None
        out.append({**with_answer(row, new), "planted_kind": k, "donor_id": donor_id, "planted_visible": True})
    schema = table.schema
    for name, type_ in PLANT_COLUMNS:
        schema = schema.append(pa.field(name, type_))
    planted = pa.Table.from_pylist(out, schema=schema)
    by_kind = {k: int(np.sum(planted["planted_kind"].to_numpy(zero_copy_only=False) == k)) for k in kinds}
    return planted, {
        "rows": len(rows),
        "planted": int(sum(by_kind.values())),
        "planted_by_kind": by_kind,
        "rows_not_plantable": int((~can_plant).sum()),
    }


def corruption_visible(before: pa.Table, after: pa.Table) -> np.ndarray:
    """bool [N]: whether the proxy sees a row's corruption, from the tokens of the row before and after planting
    (TOKEN_SCHEMA rows, same ids in the same order): its tokens or its labelled positions differ. A corruption that
    only touched text past `proxy.max_length` changes nothing the proxy trains on or is scored on."""
    if before["id"].to_pylist() != after["id"].to_pylist():
        raise ValueError("tokens before and after planting must hold the same ids in the same order")
    columns = ("input_ids", "label_start", "loss_spans")
    a, b = before.select(columns).to_pydict(), after.select(columns).to_pydict()
    return np.array([any(a[c][i] != b[c][i] for c in columns) for i in range(before.num_rows)], dtype=bool)


def mark_invisible(planted: pa.Table, visible: np.ndarray) -> tuple[pa.Table, dict]:
    """`planted_visible` set from `visible` on planted rows (null on clean rows); counts of invisible ones by kind."""
    kinds = planted["planted_kind"].to_pylist()
    flags = [None if k is None else bool(v) for k, v in zip(kinds, visible)]
    at = planted.schema.get_field_index("planted_visible")
    table = planted.set_column(at, "planted_visible", pa.array(flags, pa.bool_()))
    invisible: dict[str, int] = {}
    for k, flag in zip(kinds, flags):
        if flag is False:
            invisible[k] = invisible.get(k, 0) + 1
    return table, invisible
