"""The streaming passes of the score and select stages, over Locations (no Ray: the shells run each as a task).

Both stream record batches, so memory stays flat in corpus size: `score_gradients` writes one row per example with
every scorer's score (and each ensemble scorer's leave-one-out values); `select_and_write` finds each scorer's exact
top-k boundary in a first pass over two columns (bounded candidate set, no global sort), does the same for each
ensemble scorer's M leave-one-out selections (`stability.py`: one boundary per member, each O(k)), then writes every
selection in a single read of the corpus, and `stability.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradfilter_ray.data.formats import original_record
from gradfilter_ray.parquet_stream import parquet_files, stream_batches
from gradfilter_ray.scoring import stability
from gradfilter_ray.scoring.score_rows import _matrix, score_batch
from gradfilter_ray.scoring.scorers import GSNR_SCORERS, eligible
from gradfilter_ray.scoring.selection import Selections, TopKBoundary, mask_from_threshold, selection_plan
from gradfilter_ray.storage import Location

STABILITY_FILE = "stability.json"  # in the selection folder: selection name -> its leave-one-out stability
LOO_SELECTED = "loo_selected"  # column of an ensemble selection's Parquet subset: in how many LOO selections a row is
NO_LOO_SCORES = "scores.parquet has no leave-one-out scores for this scorer (re-run the scoring stage)"


def score_gradients(
    gradients: Location, scores: Location, eps: float, random_seed: int, scorers: Sequence[str] | None = None
) -> dict:
    """gradients/ -> scores.parquet; returns counts (rows eligible for G-SNR, and why the others are not).
    Leave-one-out columns are written for the ensemble scorers among `scorers` (None: every ensemble scorer)."""
    loo_scorers = [s for s in GSNR_SCORERS if scorers is None or s in scorers]
    writer = None
    rows = n_eligible = 0
    reasons: dict[str, int] = {}
    try:
        for batch in stream_batches(gradients):
            if batch.num_rows == 0:
                continue
            scored = score_batch(batch, eps, random_seed, loo_scorers)
            if writer is None:
                writer = pq.ParquetWriter(scores.writable().path, scored.schema, filesystem=scores.filesystem)
            writer.write_table(scored)
            rows += scored.num_rows
            n_eligible += int(eligible(scored["gsnr"].to_numpy(zero_copy_only=False)).sum())
            for item in pc.value_counts(scored["reason"].drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise RuntimeError(f"{gradients} holds no rows to score")
    return {
        "rows": rows,
        "rows_eligible": n_eligible,
        "rows_ineligible": rows - n_eligible,
        "ineligible_by_reason": dict(sorted(reasons.items())),
    }


def _column_chunks(where: Location, columns: list[str]):
    for batch in stream_batches(where, columns):
        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _top_rows(scores: Location, scorer: str, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The exact top k rows of one scorer (ties -> smaller id) in two streaming reads of two columns: one finds
    the boundary, one collects the rows inside it. Returns (ids, scores, eligible count)."""
    boundary = TopKBoundary(k)
    for chunk in _column_chunks(scores, ["id", scorer]):
        boundary.update(chunk[scorer], chunk["id"], eligible(chunk[scorer]))
    limit = boundary.result()
    del boundary
    ids, values, n_eligible = [], [], 0
    for chunk in _column_chunks(scores, ["id", scorer]):
        ok = eligible(chunk[scorer])
        n_eligible += int(ok.sum())
        mask = mask_from_threshold(chunk[scorer], chunk["id"], ok, *limit)
        ids.append(chunk["id"][mask])
        values.append(chunk[scorer][mask])
    if not ids:
        return np.empty(0, np.int64), np.empty(0, np.float64), 0
    return np.concatenate(ids), np.concatenate(values), n_eligible


def select_ids(scores: Location, plan: dict[str, dict[str, int]]) -> tuple[Selections, dict]:
    """Exact top-k (ties -> smaller id) of every planned selection. One scorer at a time (so only one boundary's
    candidates are alive), each at its largest k; the smaller ks are ranked inside those rows. Returns the
    selections and name -> counts."""
    selections, counts, _, _ = _select(scores, plan, loo=False)
    return selections, counts


def _select(
    scores: Location, plan: dict[str, dict[str, int]], loo: bool = True
) -> tuple[Selections, dict, dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray] | None]]:
    """`select_ids`, plus (with `loo`) for every ensemble scorer's selection its leave-one-out stability: name ->
    stability record (`stability.json`), and name -> (sorted ids, LOO counts) of its rows, or None where undefined.
    The mean Jaccard joins each ensemble selection's counts."""
    selections = Selections()
    counts: dict[str, dict] = {}
    records: dict[str, dict] = {}
    per_row: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for scorer, ks in plan.items():
        ids, values, n_eligible = _top_rows(scores, scorer, max(ks.values()))
        selections.add_ranked(scorer, ids, values, ks)
        for name, k in ks.items():
            counts[name] = {"k": k, "selected": int(min(k, ids.shape[0])), "n_eligible": n_eligible}
        if loo and scorer in GSNR_SCORERS:
            found = _loo_stability(scores, scorer, ks, ids, values)
            for name, (record, rows) in found.items():
                records[name], per_row[name] = record, rows
                counts[name]["mean_jaccard"] = record["mean_jaccard"]
        del ids, values
    return selections, counts, records, per_row


def _loo_members(scores: Location, scorer: str) -> int | None:
    """M, from the length of the scorer's leave-one-out lists (None: scores.parquet has no such column)."""
    column = stability.loo_column(scorer)
    with parquet_files(scores)[0].open_input() as handle:
        if column not in pq.ParquetFile(handle).schema_arrow.names:
            return None
    for batch in stream_batches(scores, [column]):
        if batch.num_rows:
            return int(pc.list_value_length(batch.column(column))[0].as_py())
    return 0


def _loo_chunks(scores: Location, scorer: str, members: int):
    """(ids int64 [n], leave-one-out values float64 [n, M]) per record batch."""
    column = stability.loo_column(scorer)
    for batch in stream_batches(scores, ["id", column]):
        if batch.num_rows == 0:
            continue
        values = _matrix(batch.column(column))
        if values.shape[1] != members:
            raise ValueError(f"{column}: rows of scores.parquet have different member counts")
        yield batch.column("id").to_numpy(), values


def _loo_top_rows(scores: Location, scorer: str, k: int, members: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each member j, the exact top k rows by the scorer's value with j left out (ties -> smaller id), as
    (ids, values): like `_top_rows`, two streaming reads, one `TopKBoundary` per member (M x O(k) candidates)."""
    boundaries = [TopKBoundary(k) for _ in range(members)]
    for ids, values in _loo_chunks(scores, scorer, members):
        for j, boundary in enumerate(boundaries):
            boundary.update(values[:, j], ids, eligible(values[:, j]))
    limits = [boundary.result() for boundary in boundaries]
    del boundaries
    picked: list[tuple[list, list]] = [([], []) for _ in range(members)]
    for ids, values in _loo_chunks(scores, scorer, members):
        for j, limit in enumerate(limits):
            column = values[:, j]
            mask = mask_from_threshold(column, ids, eligible(column), *limit)
            picked[j][0].append(ids[mask])
            picked[j][1].append(column[mask])
    return [
        (np.concatenate(i) if i else np.empty(0, np.int64), np.concatenate(v) if v else np.empty(0, np.float64))
        for i, v in picked
    ]


def _loo_stability(
    scores: Location, scorer: str, ks: dict[str, int], ids: np.ndarray, values: np.ndarray
) -> dict[str, tuple[dict, tuple[np.ndarray, np.ndarray] | None]]:
    """Name -> (stability record, (sorted ids, LOO counts) or None where undefined) for one ensemble scorer's
    selections, given its full top rows at the largest k (`ids`, `values`)."""
    members = _loo_members(scores, scorer)
    if members is None:
        return {name: (stability.undefined(None, NO_LOO_SCORES), None) for name in ks}
    if members < stability.MIN_MEMBERS:
        return {name: (stability.undefined(members), None) for name in ks}
    loo = [stability.ranked_ids(i, v) for i, v in _loo_top_rows(scores, scorer, max(ks.values()), members)]
    full = stability.ranked_ids(ids, values)
    found = {}
    for name, k in ks.items():
        record, rows, in_loo = stability.selection_stability(full[:k], [ranked[:k] for ranked in loo])
        found[name] = (record, (rows, in_loo))
    return found


def select_and_write(scores: Location, data: Location, out: Location, scorers: list[str], ratios: list[float]) -> dict:
    n_base = sum(int((c["n_response_tokens"] > 0).sum()) for c in _column_chunks(scores, ["n_response_tokens"]))
    selections, counts, records, per_row = _select(scores, selection_plan(scorers, ratios, n_base))
    write_selections(data, selections, out, per_row)
    (out / STABILITY_FILE).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
    return {"rows_with_response": n_base, "selections": counts}


def _loo_selected(rows: tuple[np.ndarray, np.ndarray] | None, ids: np.ndarray) -> pa.Array:
    """The `loo_selected` values of selected rows `ids` (null for every row where leave-one-out is undefined)."""
    if rows is None:
        return pa.nulls(ids.shape[0], pa.int64())
    sorted_ids, in_loo = rows
    pos = np.searchsorted(sorted_ids, ids)
    if not (pos < sorted_ids.shape[0]).all() or not (sorted_ids[pos] == ids).all():
        raise ValueError("a selected row has no leave-one-out count")
    return pa.array(in_loo[pos], pa.int64())


def write_selections(
    data: Location,
    selections: Selections,
    out: Location,
    loo_selected: dict[str, tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> None:
    """One pass over the corpus writes every selection: JSONL in the input's own keys plus a Parquet twin; the
    twin of a selection named in `loo_selected` (an ensemble scorer's) gains the column `loo_selected`."""
    out.make_dir()
    names = selections.names()
    loo_selected = loo_selected or {}
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
                rows = chosen.to_pylist()
                jsonl[name].write(
                    "".join(json.dumps(original_record(r), ensure_ascii=False) + "\n" for r in rows).encode()
                )
                if name in loo_selected:
                    chosen = chosen.append_column(LOO_SELECTED, _loo_selected(loo_selected[name], ids[mask]))
                if name not in writers:
                    where = out / f"{name}.parquet"
                    writers[name] = pq.ParquetWriter(where.path, chosen.schema, filesystem=where.filesystem)
                writers[name].write_table(chosen)
    finally:
        for fh in jsonl.values():
            fh.close()
        for writer in writers.values():
            writer.close()
    with parquet_files(data)[0].open_input() as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    for name in names:
        if name not in writers:  # an empty selection still gets its (empty) Parquet twin
            where = out / f"{name}.parquet"
            empty = schema.append(pa.field(LOO_SELECTED, pa.int64())) if name in loo_selected else schema
            pq.write_table(empty.empty_table(), where.path, filesystem=where.filesystem)
