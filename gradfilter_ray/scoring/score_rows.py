"""One batch of the gradients table -> the same rows with every G-SNR component and every scorer's score (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradfilter_ray.scoring import baselines, gsnr, stability
from gradfilter_ray.scoring.scorers import GSNR_SCORERS


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float64> column of N lists of M -> [N, M] float64 (without a Python-level loop)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("rows of the gradients table have different member counts")
    m = int(lengths[0]) if len(lengths) else 0
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(arr), m)


def _lists(matrix: np.ndarray) -> pa.ListArray:
    """[N, M] float64 -> list<float64> column of N lists of M (NaN stays NaN, not null)."""
    n, m = matrix.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * m, pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).reshape(-1), pa.float64()))


def score_batch(
    batch: pa.RecordBatch, eps: float, random_seed: int, loo_scorers: Sequence[str] = GSNR_SCORERS
) -> pa.Table:
    """Columns: id, token counts, every `scorers.SCORERS` column (NaN where the row may not be ranked by it),
    `noise`, the reasons (`reason` for G-SNR and its ablations, `ifd_reason`), IFD's two losses, and per scorer of
    `loo_scorers` (ensemble scorers) its leave-one-out values `{scorer}_loo` (list<float64> of M, `stability.py`)."""
    ids = batch.column("id").to_numpy()
    n_resp = batch.column("n_response_tokens").to_numpy()
    sq_early, sq_late = _matrix(batch.column("sq_norm_early")), _matrix(batch.column("sq_norm_late"))
    table = gsnr.score_table(
        sq_early,
        sq_late,
        _matrix(batch.column("loss_early")),
        _matrix(batch.column("loss_late")),
        n_resp,
        eps,
    )
    loo = stability.loo_scores(sq_early, sq_late, n_resp, table["eligible"], eps, loo_scorers)
    ifd, _, ifd_reason = baselines.ifd_scores(
        batch.column("ifd_loss_cond").to_numpy(zero_copy_only=False),
        batch.column("ifd_loss_uncond").to_numpy(zero_copy_only=False),
        n_resp,
    )
    has_response = n_resp > 0
    columns = {
        "id": ids,
        "n_response_tokens": n_resp,
        "n_tokens": batch.column("n_tokens").to_numpy(),
        "reason": pa.array(list(table["reason"]), pa.string()),
        **{name: table[name] for name in gsnr.SCORE_COLUMNS},
        "random": np.where(has_response, baselines.random_scores(ids, random_seed), np.nan),
        "length": np.where(has_response, baselines.length_scores(n_resp), np.nan),
        "ifd": ifd,
        "ifd_reason": pa.array(list(ifd_reason), pa.string()),
        "ifd_loss_cond": batch.column("ifd_loss_cond"),
        "ifd_loss_uncond": batch.column("ifd_loss_uncond"),
        **{stability.loo_column(name): _lists(values) for name, values in loo.items()},
    }
    return pa.table(columns)
