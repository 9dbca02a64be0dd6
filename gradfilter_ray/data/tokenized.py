"""Canonical rows -> token columns: what the `tokens` stage writes once and the ensemble and extraction both read.

Two token sequences per row: ``input_ids`` with its labelled positions ``loss_spans`` (flat [start, stop) pairs: one
span from ``label_start`` to the end for an Alpaca row, one per answer turn for a conversation; the training and
gradient-norm input, also IFD's conditioned pass), and ``response_input_ids`` / ``response_label_start`` (the
response alone after a BOS, IFD's unconditioned pass; for a conversation its answers alone, one after another).
Rows without a trainable token stay, with ``n_response_tokens`` = 0, and ``skip_reason`` says why when it is not
plain truncation.

Prompt formats (`proxy.template`): `alpaca` tokenises Alpaca rows and single-exchange conversations with the Alpaca
prompt (exactly as before conversations were read); a multi-turn conversation has no Alpaca form
(`skip_reason` multi_turn_needs_chat). `chat` renders every row through the chat template (an Alpaca row as one
user turn, instruction then input, and one answer) and trains on every answer turn (data/chat_tokens.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow as pa

from gradfilter_ray.config import ProxyConfig
from gradfilter_ray.data.chat_tokens import (
    cut_pieces,
    hf_render,
    template_errors,
    tokenize_pieces,
    whole_text_encoder,
)
from gradfilter_ray.data.prompt import (
    Tokenized,
    assemble,
    label_start,
    spans_from_labels,
    tokenize_batch,
    tokenize_response_only,
)
from gradfilter_ray.losses import IGNORE_INDEX

MULTI_TURN_NEEDS_CHAT = "multi_turn_needs_chat"
CHAT_TEMPLATE_ERROR = "chat_template_error"

TOKEN_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("label_start", pa.int32()),
        ("loss_spans", pa.list_(pa.int32())),
        ("n_response_tokens", pa.int32()),
        ("n_tokens", pa.int32()),
        ("response_input_ids", pa.list_(pa.int32())),
        ("response_label_start", pa.int32()),
        ("skip_reason", pa.string()),
    ]
)
TEXT_COLUMNS = ["id", "instruction", "input", "output", "conversation", "tools"]  # what tokenisation reads of `data/`


def _row(rid, ex, alone, skip: str | None = None) -> dict:
    return {
        "id": rid,
        "input_ids": ex.input_ids,
        "label_start": label_start(ex),
        "loss_spans": spans_from_labels(ex.labels),
        "n_response_tokens": ex.n_response_tokens,
        "n_tokens": len(ex.input_ids),
        "response_input_ids": alone.input_ids,
        "response_label_start": label_start(alone),
        "skip_reason": skip,
    }


def untrained(input_ids: list[int]) -> Tokenized:
    """A row kept for the record with no labelled token (what a row whose prompt fills max_length looks like)."""
    ids = list(input_ids)
    return Tokenized(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), n_response_tokens=0, truncated=False)


def _multi_turn(conversation: str | None) -> bool:
    from gradfilter_ray.data.formats import is_single_exchange

    return conversation is not None and not is_single_exchange(json.loads(conversation))


def alpaca_rows(table: pa.Table, tokenizer, proxy: ProxyConfig) -> list[dict]:
    cols = table.select(["id", "instruction", "input", "output", "conversation"]).to_pydict()
    examples = tokenize_batch(
        tokenizer, cols["instruction"], cols["input"], cols["output"], proxy.max_length, proxy.add_bos, proxy.add_eos
    )
    alone = tokenize_response_only(tokenizer, cols["output"], proxy.max_length)
    rows = []
    for rid, ex, solo, conversation in zip(cols["id"], examples, alone, cols["conversation"]):
        if _multi_turn(conversation):  # no Alpaca form: counted, never trained on a part of it
            # one token: kept for the record, and nothing for the extraction to spend compute on
            rows.append(_row(rid, untrained(ex.input_ids[:1]), untrained(solo.input_ids[:1]), MULTI_TURN_NEEDS_CHAT))
        else:
            rows.append(_row(rid, ex, solo))
    return rows


def as_turns(instruction: str, input_: str, output: str, conversation: str | None) -> list[dict[str, str]]:
    """A row's conversation; an Alpaca row as one user turn (instruction, then its input) and one answer."""
    if conversation is not None:
        return json.loads(conversation)
    question = instruction + (f"\n\n{input_}" if input_ and input_.strip() else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": output}]


def chat_tokenize(
    tokenizer,
    turns,
    max_length: int,
    chat_template: str | None = None,
    train_tool_calls: bool = True,
    tools: list[dict] | None = None,
):
    """One conversation (and the tools it may call) through the chat template (`chat_template`, or the
    tokenizer's own): a ChatTokenized."""
    pieces = cut_pieces(turns, hf_render(tokenizer, chat_template, tools), train_tool_calls)
    return tokenize_pieces(pieces, whole_text_encoder(tokenizer)(pieces), max_length)


def check_chat_tokenizer(tokenizer, chat_template: str | None) -> None:
    """What every row needs, checked once: a template to render with and a fast tokenizer (its offsets place each
    token in its piece). A config error, not a row's fault: it stops the stage."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template: chat needs a chat template: this tokenizer has none, set chat_template (Jinja)")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("template: chat needs a fast tokenizer (its offsets map tokens to turns)")


def chat_rows(table: pa.Table, tokenizer, proxy: ProxyConfig) -> list[dict]:
    check_chat_tokenizer(tokenizer, proxy.chat_template)
    cols = table.select(TEXT_COLUMNS).to_pydict()
    refused = template_errors()
    rows = []
    texts = zip(cols["instruction"], cols["input"], cols["output"], cols["conversation"])
    for rid, fields, tools in zip(cols["id"], texts, cols["tools"]):
        try:
            turns = as_turns(*fields)
            ex = chat_tokenize(
                tokenizer,
                turns,
                proxy.max_length,
                proxy.chat_template,
                proxy.train_tool_calls,
                json.loads(tools) if tools else None,
            )
        except refused:
            question = tokenizer(fields[0], add_special_tokens=False)["input_ids"][:1]
            rows.append(_row(rid, untrained(question), untrained(question), CHAT_TEMPLATE_ERROR))
            continue
        answers = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
        # the answers alone, after a BOS as an Alpaca response alone is (their end markers are in them already)
        alone = assemble([], answers, proxy.max_length, tokenizer.bos_token_id, None)
        rows.append(_row(rid, ex, alone))
    return rows


def tokenize_table(table: pa.Table, tokenizer, proxy: ProxyConfig) -> pa.Table:
    """[N] canonical rows (TEXT_COLUMNS; `conversation` and `tools` may be absent: Alpaca rows, older data/) -> [N]
    TOKEN_SCHEMA rows, in the same order."""
    for column in ("conversation", "tools"):  # absent: Alpaca rows, or data/ written before they were read
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
    rows = chat_rows(table, tokenizer, proxy) if proxy.template == "chat" else alpaca_rows(table, tokenizer, proxy)
    return pa.Table.from_pylist(rows, schema=TOKEN_SCHEMA)


_tokenizers: dict[str, object] = {}  # per worker process: Ray reuses workers, so each loads a tokenizer once


def tokenize_rows(table: pa.Table, proxy: ProxyConfig) -> pa.Table:
    """Ray Data UDF (a plain task): `tokenize_table` with the proxy's tokenizer, loaded once per worker process."""
    from gradfilter_ray.models import load_tokenizer

    key = json.dumps(asdict(proxy.model), sort_keys=True, default=str)
    if key not in _tokenizers:
        _tokenizers[key] = load_tokenizer(proxy.model)
    return tokenize_table(table, _tokenizers[key], proxy)
