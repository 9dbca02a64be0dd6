"""One batch of the gradients table -> the same rows with every G-SNR component and every scorer's score (pure)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradfilter_ray.scoring import baselines, gsnr


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float64> column of N lists of M -> [N, M] float64 (without a Python-level loop)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("rows of the gradients table have different member counts")
    m = int(lengths[0]) if len(lengths) else 0
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(arr), m)


def score_batch(batch: pa.RecordBatch, eps: float, random_seed: int) -> pa.Table:
    """Columns: id, token counts, every `scorers.SCORERS` column (NaN where the row may not be ranked by it),
    `noise`, the reasons (`reason` for G-SNR and its ablations, `ifd_reason`) and IFD's two losses."""
    ids = batch.column("id").to_numpy()
    n_resp = batch.column("n_response_tokens").to_numpy()
    table = gsnr.score_table(
        _matrix(batch.column("sq_norm_early")),
        _matrix(batch.column("sq_norm_late")),
        _matrix(batch.column("loss_early")),
        _matrix(batch.column("loss_late")),
        n_resp,
        eps,
    )
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
    }
    return pa.table(columns)
