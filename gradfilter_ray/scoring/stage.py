"""Score and select stages (shells): stream the gradients table through the pure scorers, then pick subsets.

Both stages stream record batches (memory flat in corpus size): `score` writes one row per example with every
G-SNR component, every ablation and every baseline's score; `select` finds each (scorer, ratio)'s exact top-k
boundary in a first pass over two columns (bounded candidate set, no global sort) and filters in a second pass
that writes every selection at once while reading the corpus a single time.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from gradfilter_ray.config import Config
from gradfilter_ray.data.formats import original_record
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring import baselines, gsnr
from gradfilter_ray.scoring.selection import k_for_ratio, mask_from_threshold, threshold_for_top_k

BATCH_ROWS = 65_536
# pyarrow's scanner reads several files ahead by default, so its memory grows with the number of input files; one
# file and a couple of batches ahead keep the driver's memory flat in corpus size.
STREAMING = {"fragment_readahead": 1, "batch_readahead": 2}

# scorer -> (score column, eligibility column) in scores.parquet; every score ranks descending.
BASELINES = {
    "random": ("random", "base_eligible"),
    "length": ("length", "base_eligible"),
    "ifd": ("ifd", "ifd_eligible"),
}


def scorer_columns(name: str) -> tuple[str, str]:
    if name in gsnr.SCORERS:
        return gsnr.SCORERS[name], "eligible"
    if name in BASELINES:
        return BASELINES[name]
    valid = sorted([*gsnr.SCORERS, *BASELINES, "full"])
    raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(valid)}")


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float64> column of N lists of M -> [N, M] float64 (without a Python-level loop)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("rows of the gradients table have different member counts")
    m = int(lengths[0]) if len(lengths) else 0
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(arr), m)


def score_batch(batch: pa.RecordBatch, eps: float, random_seed: int) -> pa.Table:
    """One batch of gradients rows -> the same rows with every component and every scorer's score."""
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
    ifd, ifd_eligible, ifd_reason = baselines.ifd_scores(
        batch.column("ifd_loss_cond").to_numpy(zero_copy_only=False),
        batch.column("ifd_loss_uncond").to_numpy(zero_copy_only=False),
        n_resp,
    )
    columns = {
        "id": ids,
        "n_response_tokens": n_resp,
        "n_tokens": batch.column("n_tokens").to_numpy(),
        "eligible": table["eligible"],
        "reason": pa.array(list(table["reason"]), pa.string()),
        **{name: table[name] for name in gsnr.SCORE_COLUMNS},
        "base_eligible": n_resp > 0,
        "random": baselines.random_scores(ids, random_seed),
        "length": baselines.length_scores(n_resp),
        "ifd": ifd,
        "ifd_eligible": ifd_eligible,
        "ifd_reason": pa.array(list(ifd_reason), pa.string()),
        "ifd_loss_cond": batch.column("ifd_loss_cond"),
        "ifd_loss_uncond": batch.column("ifd_loss_uncond"),
    }
    return pa.table(columns)


def run_score(cfg: Config, rundir: RunDir, staged: Path) -> tuple[list[str], dict]:
    for name in cfg.scoring.scorers:
        if name != "full":
            scorer_columns(name)
    dataset = pads.dataset(rundir.gradients, format="parquet")
    writer = None
    rows = eligible = 0
    reasons: dict[str, int] = {}
    try:
        for batch in dataset.to_batches(batch_size=BATCH_ROWS, **STREAMING):
            if batch.num_rows == 0:
                continue
            scored = score_batch(batch, cfg.scoring.eps, cfg.scoring.random_seed)
            if writer is None:
                writer = pq.ParquetWriter(staged / "scores.parquet", scored.schema)
            writer.write_table(scored)
            rows += scored.num_rows
            eligible += int(pc.sum(scored["eligible"]).as_py() or 0)
            for item in pc.value_counts(scored["reason"].drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise RuntimeError(f"{rundir.gradients} holds no rows to score")
    return ["scores.parquet"], {
        "rows": rows,
        "rows_eligible": eligible,
        "rows_ineligible": rows - eligible,
        "ineligible_by_reason": dict(sorted(reasons.items())),
    }


def selection_name(scorer: str, ratio: float) -> str:
    return f"{scorer}_{ratio:g}"


def _column_chunks(path: Path, columns: list[str]):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield [batch.column(c).to_numpy(zero_copy_only=False) for c in columns]


def selected_ids(scores_path: Path, scorer: str, k: int) -> tuple[np.ndarray, int]:
    """Exact top-k ids of one scorer (ties -> smaller id), streaming; returns (ids, eligible count)."""
    score_col, elig_col = scorer_columns(scorer)
    columns = ["id", score_col, elig_col]
    ids_it, scores_it, elig_it = itertools.tee(_column_chunks(scores_path, columns), 3)
    threshold, max_tied = threshold_for_top_k(
        (s for _, s, _ in scores_it), (i for i, _, _ in ids_it), k, (e for _, _, e in elig_it)
    )
    picked, n_eligible = [], 0
    for ids, scores, elig in _column_chunks(scores_path, columns):
        n_eligible += int(elig.sum())
        mask = mask_from_threshold(scores, ids, elig, threshold, max_tied)
        picked.append(ids[mask])
    return (np.concatenate(picked) if picked else np.empty(0, np.int64)), n_eligible


def run_select(cfg: Config, rundir: RunDir, staged: Path) -> tuple[list[str], dict]:
    scores_path = rundir.root / "scores.parquet"
    n_base = sum(int(e.sum()) for (e,) in _column_chunks(scores_path, ["base_eligible"]))
    selections: dict[str, np.ndarray] = {}
    counts: dict[str, dict] = {}
    for scorer in cfg.scoring.scorers:
        if scorer == "full":
            ids, n_eligible = selected_ids(scores_path, "random", n_base)
            selections["full"] = ids
            counts["full"] = {"k": n_base, "selected": len(ids), "n_eligible": n_eligible}
            continue
        for ratio in cfg.selection.ratios:
            # Every scorer selects the same k (a share of the rows that have a response token), so subsets compare
            # at equal size; a scorer whose own pool is smaller (IFD drops IFD >= 1) selects its whole pool.
            k = k_for_ratio(ratio, n_base)
            ids, n_eligible = selected_ids(scores_path, scorer, k)
            name = selection_name(scorer, ratio)
            selections[name] = ids
            counts[name] = {"k": k, "selected": len(ids), "n_eligible": n_eligible}
    out = staged / "selected"
    write_selections(rundir, selections, out)
    return ["selected"], {"rows_with_response": n_base, "selections": counts}


def write_selections(rundir: RunDir, selections: dict[str, np.ndarray], out: Path) -> None:
    """One pass over the corpus writes every selection: JSONL in the input's own keys plus a Parquet twin."""
    out.mkdir(parents=True)
    value_sets = {name: pa.array(ids, pa.int64()) for name, ids in selections.items()}
    jsonl = {name: (out / f"{name}.jsonl").open("w", encoding="utf-8") for name in selections}
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for batch in pads.dataset(rundir.data, format="parquet").to_batches(batch_size=BATCH_ROWS // 4, **STREAMING):
            table = pa.Table.from_batches([batch])
            for name, value_set in value_sets.items():
                chosen = table.filter(pc.is_in(table["id"], value_set=value_set))
                if chosen.num_rows == 0:
                    continue
                for row in chosen.to_pylist():
                    jsonl[name].write(json.dumps(original_record(row), ensure_ascii=False) + "\n")
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"{name}.parquet", chosen.schema)
                writers[name].write_table(chosen)
    finally:
        for fh in jsonl.values():
            fh.close()
        for writer in writers.values():
            writer.close()
    schema = pq.read_schema(next(iter(Path(rundir.data).glob("*.parquet"))))
    for name in selections:
        if name not in writers:  # an empty selection still gets its (empty) Parquet twin
            pq.write_table(schema.empty_table(), out / f"{name}.parquet")
