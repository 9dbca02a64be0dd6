"""Canonical rows -> token columns: what the `tokens` stage writes once and the ensemble and extraction both read.

A tokenised row is stored compactly: labels are the input ids from ``label_start`` on and -100 before it, which is
exactly what `prompt.assemble` produces, so no label column needs to travel. Two token sequences per row:
``input_ids`` / ``label_start`` (prompt + response, the training and gradient-norm input, also IFD's conditioned
pass) and ``response_input_ids`` / ``response_label_start`` (the response alone after a BOS, IFD's unconditioned
pass). Rows without a response token stay, with ``n_response_tokens`` = 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow as pa

from gradfilter_ray.config import ProxyConfig
from gradfilter_ray.data.prompt import label_start, tokenize_batch, tokenize_response_only

TOKEN_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("label_start", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("n_tokens", pa.int32()),
        ("response_input_ids", pa.list_(pa.int32())),
        ("response_label_start", pa.int32()),
    ]
)


def tokenize_table(table: pa.Table, tokenizer, proxy: ProxyConfig) -> pa.Table:
    """[N] canonical rows (id, instruction, input, output) -> [N] TOKEN_SCHEMA rows, in the same order."""
    cols = table.select(["instruction", "input", "output"]).to_pydict()
    examples = tokenize_batch(
        tokenizer, cols["instruction"], cols["input"], cols["output"], proxy.max_length, proxy.add_bos, proxy.add_eos
    )
    alone = tokenize_response_only(tokenizer, cols["output"], proxy.max_length)
    return pa.Table.from_pydict(
        {
            "id": table["id"],
            "input_ids": [ex.input_ids for ex in examples],
            "label_start": [label_start(ex) for ex in examples],
            "n_response_tokens": [ex.n_response_tokens for ex in examples],
            "n_tokens": [len(ex.input_ids) for ex in examples],
            "response_input_ids": [ex.input_ids for ex in alone],
            "response_label_start": [label_start(ex) for ex in alone],
        },
        schema=TOKEN_SCHEMA,
    )


_tokenizers: dict[str, object] = {}  # per worker process: Ray reuses workers, so each loads a tokenizer once


def tokenize_rows(table: pa.Table, proxy: ProxyConfig) -> pa.Table:
    """Ray Data UDF (a plain task): `tokenize_table` with the proxy's tokenizer, loaded once per worker process."""
    from gradfilter_ray.models import load_tokenizer

    key = json.dumps(asdict(proxy.model), sort_keys=True, default=str)
    if key not in _tokenizers:
        _tokenizers[key] = load_tokenizer(proxy.model)
    return tokenize_table(table, _tokenizers[key], proxy)
