"""Score and select stages: stream the gradients table through the pure scorers, then pick subsets.

Each stage's pass runs as one Ray task next to the data (the driver holds no table). Both stream record batches
(memory flat in corpus size): `score` writes one row per example with every
G-SNR component, every ablation and every baseline's score; `select` finds each (scorer, ratio)'s exact top-k
boundary in a first pass over two columns (bounded candidate set, no global sort) and filters in a second pass
that writes every selection at once while reading the corpus a single time.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradfilter_ray.config import Config
from gradfilter_ray.data.formats import original_record
from gradfilter_ray.parquet_stream import parquet_files, stream_batches
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import run_as_task
from gradfilter_ray.scoring import baselines, gsnr
from gradfilter_ray.scoring.selection import TopKBoundary, k_for_ratio, mask_from_threshold
from gradfilter_ray.storage import Location

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


def score_gradients(gradients: Location, scores: Location, scorers: list[str], eps: float, random_seed: int) -> dict:
    """gradients/ -> scores.parquet (one row per example, every component and every scorer); returns counts."""
    for name in scorers:
        if name != "full":
            scorer_columns(name)
    writer = None
    rows = eligible = 0
    reasons: dict[str, int] = {}
    try:
        for batch in stream_batches(gradients):
            if batch.num_rows == 0:
                continue
            scored = score_batch(batch, eps, random_seed)
            if writer is None:
                writer = pq.ParquetWriter(scores.path, scored.schema, filesystem=scores.filesystem)
            writer.write_table(scored)
            rows += scored.num_rows
            eligible += int(pc.sum(scored["eligible"]).as_py() or 0)
            for item in pc.value_counts(scored["reason"].drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise RuntimeError(f"{gradients} holds no rows to score")
    return {
        "rows": rows,
        "rows_eligible": eligible,
        "rows_ineligible": rows - eligible,
        "ineligible_by_reason": dict(sorted(reasons.items())),
    }


def run_score(cfg: Config, run: RunDir, key: str) -> dict:
    s = cfg.scoring
    return run_as_task(score_gradients, run.gradients, run.scores, list(s.scorers), s.eps, s.random_seed)


def selection_name(scorer: str, ratio: float) -> str:
    return f"{scorer}_{ratio:g}"


def _column_chunks(where: Location, columns: list[str]):
    for batch in stream_batches(where, columns):
        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


def selection_plan(scorers: list[str], ratios: list[float], n_base: int) -> dict[str, dict[str, int]]:
    """scorer -> {selection name: k}. Every scorer selects the same k (a share of the rows that have a response
    token), so subsets compare at equal size; a scorer whose own pool is smaller (IFD drops IFD >= 1) selects its
    whole pool. `full` (every row with a response token) is planned as {"full": n_base}."""
    plan: dict[str, dict[str, int]] = {}
    for scorer in scorers:
        if scorer == "full":
            plan["full"] = {"full": n_base}
        else:
            plan[scorer] = {selection_name(scorer, r): k_for_ratio(r, n_base) for r in ratios}
    return plan


class Selections:
    """Every selection's ids in compact form: per scorer, the sorted ids of its largest selection and, per id, the
    smallest k that still holds it (top-k sets of one score are nested), so memory is ~16 bytes per row of each
    scorer's largest subset; `full` is kept as the ids it excludes."""

    def __init__(self) -> None:
        self._nested: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # scorer -> (sorted ids, rank of each id)
        self._ks: dict[str, tuple[str, int]] = {}  # selection name -> (scorer, k)
        self._excluded_from_full: np.ndarray | None = None

    def add_ranked(self, scorer: str, ids: np.ndarray, scores: np.ndarray, ks: dict[str, int]) -> None:
        """`ids`/`scores`: the scorer's largest selection, any order; `ks`: selection name -> k."""
        ranks = np.empty(ids.shape[0], dtype=np.int64)
        ranks[np.lexsort((ids, -scores))] = np.arange(ids.shape[0])
        by_id = np.argsort(ids, kind="stable")
        self._nested[scorer] = (ids[by_id], ranks[by_id])
        self._ks.update({name: (scorer, k) for name, k in ks.items()})

    def add_full(self, excluded_ids: np.ndarray, k: int) -> None:
        self._excluded_from_full = np.sort(excluded_ids)
        self._ks["full"] = ("full", k)

    def names(self) -> list[str]:
        return list(self._ks)

    def mask(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Bool [len(ids)]: which of these corpus ids the selection holds."""
        scorer, k = self._ks[name]
        if scorer == "full":
            return ~_lookup(ids, self._excluded_from_full)[0]
        sorted_ids, ranks = self._nested[scorer]
        found, pos = _lookup(ids, sorted_ids)
        return found & (ranks[pos] < k)


def _lookup(ids: np.ndarray, sorted_set: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of each id in a sorted id array: a binary search per id, no hash table built per batch.
    Positions of ids not found are clipped into range (only meaningful where found)."""
    if sorted_set.shape[0] == 0:
        return np.zeros(ids.shape[0], dtype=bool), np.zeros(ids.shape[0], dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_set, ids), sorted_set.shape[0] - 1)
    return sorted_set[pos] == ids, pos


def _top_rows(scores_path: Location, scorer: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact top k rows of one scorer (ties -> smaller id) in two streaming reads of its three columns: one
    finds the boundary, one collects the rows inside it. Returns (ids, scores, eligible count)."""
    score_col, elig_col = scorer_columns(scorer)
    columns = ["id", score_col, elig_col]
    boundary = TopKBoundary(k)
    for chunk in _column_chunks(scores_path, columns):
        boundary.update(chunk[score_col], chunk["id"], chunk[elig_col])
    limit = boundary.result()
    del boundary
    ids, scores, n_eligible = [], [], 0
    for chunk in _column_chunks(scores_path, columns):
        n_eligible += int(chunk[elig_col].sum())
        mask = mask_from_threshold(chunk[score_col], chunk["id"], chunk[elig_col], *limit)
        ids.append(chunk["id"][mask])
        scores.append(chunk[score_col][mask])
    if not ids:
        return np.empty(0, np.int64), np.empty(0, np.float64), 0
    return np.concatenate(ids), np.concatenate(scores), n_eligible


def select_ids(scores_path: Location, plan: dict[str, dict[str, int]]) -> tuple[Selections, dict]:
    """Exact top-k (ties -> smaller id) of every planned selection. One scorer at a time (so only one boundary's
    candidates are alive), each at its largest k; the smaller ks are ranked inside those rows. Returns the
    selections and name -> counts."""
    selections = Selections()
    counts = {}
    for scorer, ks in plan.items():
        if scorer == "full":
            excluded, n_eligible = [], 0
            for chunk in _column_chunks(scores_path, ["id", "base_eligible"]):
                excluded.append(chunk["id"][~chunk["base_eligible"]])
                n_eligible += int(chunk["base_eligible"].sum())
            selections.add_full(np.concatenate(excluded) if excluded else np.empty(0, np.int64), ks["full"])
            counts["full"] = {"k": ks["full"], "selected": n_eligible, "n_eligible": n_eligible}
            continue
        ids, scores, n_eligible = _top_rows(scores_path, scorer, max(ks.values()))
        selections.add_ranked(scorer, ids, scores, ks)
        for name, k in ks.items():
            counts[name] = {"k": k, "selected": int(min(k, ids.shape[0])), "n_eligible": n_eligible}
    return selections, counts


def select_and_write(scores: Location, data: Location, out: Location, scorers: list[str], ratios: list[float]) -> dict:
    n_base = sum(int(c["base_eligible"].sum()) for c in _column_chunks(scores, ["base_eligible"]))
    plan = selection_plan(scorers, ratios, n_base)
    selections, counts = select_ids(scores, plan)
    write_selections(data, selections, out)
    return {"rows_with_response": n_base, "selections": counts}


def run_select(cfg: Config, run: RunDir, key: str) -> dict:
    args = (run.scores, run.data, run.selected, list(cfg.scoring.scorers), list(cfg.selection.ratios))
    return run_as_task(select_and_write, *args)


def write_selections(data: Location, selections: Selections, out: Location) -> None:
    """One pass over the corpus writes every selection: JSONL in the input's own keys plus a Parquet twin."""
    out.make_dir()
    names = selections.names()
    jsonl = {name: (out / f"{name}.jsonl").open_output() for name in names}
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for batch in stream_batches(data):
            ids = batch.column("id").to_numpy()
            for name in names:
                mask = selections.mask(name, ids)
                if not mask.any():
                    continue
                chosen = pa.Table.from_batches([batch.filter(pa.array(mask))])
                lines = "".join(
                    json.dumps(original_record(row), ensure_ascii=False) + "\n" for row in chosen.to_pylist()
                )
                jsonl[name].write(lines.encode("utf-8"))
                if name not in writers:
                    where = out / f"{name}.parquet"
                    writers[name] = pq.ParquetWriter(where.path, chosen.schema, filesystem=where.filesystem)
                writers[name].write_table(chosen)
    finally:
        for fh in jsonl.values():
            fh.close()
        for writer in writers.values():
            writer.close()
    schema = pq.ParquetFile(parquet_files(data)[0].open_input()).schema_arrow
    for name in names:
        if name not in writers:  # an empty selection still gets its (empty) Parquet twin
            where = out / f"{name}.parquet"
            pq.write_table(schema.empty_table(), where.path, filesystem=where.filesystem)
