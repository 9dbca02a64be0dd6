"""Token-budget batching of a block's rows (pure numpy).

Memory of an extraction batch grows with rows x padded length, not with rows: a fixed row count either wastes a
device on short rows or runs out of memory on long ones. Rows sorted by length (stable, so ties keep block order)
are cut greedily into batches of at most `batch_size` rows whose rows x padded length stays within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def padded_tokens(lengths: Sequence[int] | np.ndarray) -> int:
    """rows x padded length of one batch, as `data.prompt.collate_rows` pads it (to at least 1 position)."""
    lengths = np.asarray(lengths)
    return int(len(lengths) * max(1, int(lengths.max(initial=0))))


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, tokens_per_batch: int | None = None
) -> list[np.ndarray]:
    """Row indices of each batch, in ascending length order; every row in exactly one batch.

    A batch holds at most `batch_size` rows and rows x padded length <= `tokens_per_batch` (None: no token cap);
    a row longer than the budget on its own forms a batch of one.
    """
    if batch_size < 1 or (tokens_per_batch is not None and tokens_per_batch < 1):
        raise ValueError(f"batch_size and tokens_per_batch must be >= 1, got {batch_size}, {tokens_per_batch}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    begin, width = 0, 1
    for end, row in enumerate(order):
        # Ascending order: the row joining a batch sets its padded length.
        width_with = max(width, int(lengths[row]))
        full = end - begin == batch_size
        over = tokens_per_batch is not None and (end - begin + 1) * width_with > tokens_per_batch
        if end > begin and (full or over):
            batches.append(order[begin:end])
            begin, width_with = end, max(1, int(lengths[row]))
        width = width_with
    if begin < len(order):
        batches.append(order[begin:])
    return batches
