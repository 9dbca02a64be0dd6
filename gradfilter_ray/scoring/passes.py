"""The streaming passes of the score and select stages, over Locations (no Ray: the shells run each as a task).

Both stream record batches, so memory stays flat in corpus size: `score_gradients` writes one row per example with
every scorer's score; `select_and_write` finds each scorer's exact top-k boundary in a first pass over two columns
(bounded candidate set, no global sort), then writes every selection in a single read of the corpus.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradfilter_ray.data.formats import original_record
from gradfilter_ray.parquet_stream import parquet_files, stream_batches
from gradfilter_ray.scoring.score_rows import score_batch
from gradfilter_ray.scoring.scorers import eligible
from gradfilter_ray.scoring.selection import Selections, TopKBoundary, mask_from_threshold, selection_plan
from gradfilter_ray.storage import Location


def score_gradients(gradients: Location, scores: Location, eps: float, random_seed: int) -> dict:
    """gradients/ -> scores.parquet; returns counts (rows eligible for G-SNR, and why the others are not)."""
    writer = None
    rows = n_eligible = 0
    reasons: dict[str, int] = {}
    try:
        for batch in stream_batches(gradients):
            if batch.num_rows == 0:
                continue
            scored = score_batch(batch, eps, random_seed)
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
    selections = Selections()
    counts = {}
    for scorer, ks in plan.items():
        ids, values, n_eligible = _top_rows(scores, scorer, max(ks.values()))
        selections.add_ranked(scorer, ids, values, ks)
        for name, k in ks.items():
            counts[name] = {"k": k, "selected": int(min(k, ids.shape[0])), "n_eligible": n_eligible}
    return selections, counts


def select_and_write(scores: Location, data: Location, out: Location, scorers: list[str], ratios: list[float]) -> dict:
    n_base = sum(int((c["n_response_tokens"] > 0).sum()) for c in _column_chunks(scores, ["n_response_tokens"]))
    selections, counts = select_ids(scores, selection_plan(scorers, ratios, n_base))
    write_selections(data, selections, out)
    return {"rows_with_response": n_base, "selections": counts}


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
                rows = chosen.to_pylist()
                jsonl[name].write(
                    "".join(json.dumps(original_record(r), ensure_ascii=False) + "\n" for r in rows).encode()
                )
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
            pq.write_table(schema.empty_table(), where.path, filesystem=where.filesystem)
