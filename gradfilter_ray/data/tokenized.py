"""Canonical rows -> token columns, shared by the ensemble and extraction stages.

A tokenised row is stored compactly as (``id``, ``input_ids`` int32 list, ``label_start``, ``n_response_tokens``):
labels are the input ids from ``label_start`` on and -100 before it, which is exactly what `prompt.assemble`
produces, so no label column needs to travel.
"""

from __future__ import annotations

import pyarrow as pa

from gradfilter_ray.config import ProxyConfig
from gradfilter_ray.data.prompt import label_start, tokenize_batch

TOKEN_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("label_start", pa.int32()),
        ("n_response_tokens", pa.int32()),
    ]
)


def tokenize_table(table: pa.Table, tokenizer, proxy: ProxyConfig) -> pa.Table:
    """[N] canonical rows -> [N] TOKEN_SCHEMA rows (rows without response tokens stay, with n_response_tokens=0)."""
    cols = table.select(["instruction", "input", "output"]).to_pydict()
    examples = tokenize_batch(
        tokenizer, cols["instruction"], cols["input"], cols["output"], proxy.max_length, proxy.add_bos, proxy.add_eos
    )
    return pa.Table.from_pydict(
        {
            "id": table["id"],
            "input_ids": [ex.input_ids for ex in examples],
            "label_start": [label_start(ex) for ex in examples],
            "n_response_tokens": [ex.n_response_tokens for ex in examples],
        },
        schema=TOKEN_SCHEMA,
    )


class TokenizeRows:
    """Ray Data UDF: loads the proxy tokenizer once per worker, tokenises canonical rows."""

    def __init__(self, proxy: ProxyConfig) -> None:
        from gradfilter_ray.models import load_tokenizer

        self.proxy = proxy
        self.tokenizer = load_tokenizer(proxy.model)

    def __call__(self, table: pa.Table) -> pa.Table:
        return tokenize_table(table, self.tokenizer, self.proxy)
