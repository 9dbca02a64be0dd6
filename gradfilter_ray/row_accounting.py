"""The check behind every stage that rewrites the corpus row by row (tokens, gradients): each input id exactly once."""

from __future__ import annotations

import numpy as np

from gradfilter_ray.parquet_stream import read_columns
from gradfilter_ray.storage import Location


def check_exactly_once(input_ids: np.ndarray, output_ids: np.ndarray, output: str = "the output") -> None:
    """Every input id appears exactly once in the output (no loss, no duplication from retries)."""
    uniq, counts = np.unique(output_ids, return_counts=True)
    if (counts > 1).any():
        raise RuntimeError(f"{int((counts > 1).sum())} ids appear more than once in {output}")
    missing = np.setdiff1d(input_ids, uniq)
    extra = np.setdiff1d(uniq, input_ids)
    if len(missing) or len(extra):
        raise RuntimeError(f"{output} lost {len(missing)} ids and invented {len(extra)}")


def account_token_rows(expected: Location, written: Location) -> dict:
    """`written` (rows with token counts) holds every id of `expected` exactly once; its row and token counts."""
    table = read_columns(written, ["id", "n_tokens", "n_response_tokens"])
    check_exactly_once(read_columns(expected, ["id"])["id"].to_numpy(), table["id"].to_numpy(), str(written))
    return {
        "rows": table.num_rows,
        "rows_no_response_tokens": int(np.sum(table["n_response_tokens"].to_numpy() == 0)),
        "tokens": int(np.sum(table["n_tokens"].to_numpy())),
    }
