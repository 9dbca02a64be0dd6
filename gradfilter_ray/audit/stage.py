"""The audit's own pieces of work (shells around `plant.py` and `recovery.py`); the pipeline runs them as Ray tasks
around the ordinary tokens, ensemble, gradients and scoring stages, which it runs on the audit's run directory.

`sample_and_plant`: `data/` -> `audit/data/`: a seeded sample of the kept rows (exact, streaming: the `rows` ids
with the highest keyed-hash score, as the random baseline draws them, so memory stays O(rows) whatever the corpus),
with planted rows. `write_recovery`: `audit/scoring/scores.parquet` + `audit/data/` -> `audit/recovery.{csv,md,json}`.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pyarrow as pa

from gradfilter_ray.audit.plant import corruption_visible, mark_invisible, plant
from gradfilter_ray.audit.recovery import COLUMNS, headline, headline_ratio, markdown, recovery_table
from gradfilter_ray.config import AuditConfig, ProxyConfig
from gradfilter_ray.parquet_stream import read_columns, stream_batches, write_whole
from gradfilter_ray.scoring.baselines import random_scores
from gradfilter_ray.scoring.selection import TopKBoundary, mask_from_threshold
from gradfilter_ray.storage import Location

RECOVERY_JSON, RECOVERY_TABLE, RECOVERY_CSV = "recovery.json", "recovery.md", "recovery.csv"  # in audit/

# The sample's draw must not be the random baseline's ranking of the same rows (scoring.random_seed may equal
# audit.seed): a fixed offset gives it its own stream.
_SAMPLE_STREAM = 0x41554449


def sample_and_plant(data: Location, out: Location, audit: AuditConfig, proxy: ProxyConfig) -> dict:
    seed = audit.seed + _SAMPLE_STREAM
    boundary = TopKBoundary(audit.rows)
    kept = 0
    for batch in stream_batches(data, ["id"]):
        ids = batch.column("id").to_numpy()
        boundary.update(random_scores(ids, seed), ids)
        kept += len(ids)
    limit = boundary.result()
    parts = []
    for batch in stream_batches(data):
        ids = batch.column("id").to_numpy()
        mask = mask_from_threshold(random_scores(ids, seed), ids, np.ones(len(ids), bool), *limit)
        if mask.any():
            parts.append(pa.Table.from_batches([batch.filter(pa.array(mask))]))
    if not parts:
        raise ValueError(f"{data} holds no rows to audit")
    sample = pa.concat_tables(parts)
    sample = sample.take(pa.array(np.argsort(sample["id"].to_numpy(), kind="stable")))
    planted, counts = plant(sample, audit.corrupt_fraction, list(audit.kinds), audit.seed)
    # Here, not at the top: tokenisation pulls in torch, which the driver (it imports this module through the
    # pipeline) never needs.
    from gradfilter_ray.data.tokenized import tokenize_rows

    visible = corruption_visible(tokenize_rows(sample, proxy), tokenize_rows(planted, proxy))
    planted, invisible = mark_invisible(planted, visible)
    out.make_dir()
    write_whole(out / "part-0.parquet", planted)
    return {"rows_in_data": kept, **counts, "planted_invisible_by_kind": invisible}


def write_recovery(
    scores: Location, data: Location, out: Location, scorers: list[str], ratios: list[float], audit: AuditConfig
) -> dict:
    labels = read_columns(data, ["id", "planted_kind", "planted_visible"]).to_pydict()
    # A planted row whose corruption lies past proxy.max_length is clean as far as the proxy can tell: counted apart.
    kind_of = {
        i: (k if v else None) for i, k, v in zip(labels["id"], labels["planted_kind"], labels["planted_visible"])
    }
    invisible = sum(v is False for v in labels["planted_visible"])
    table = read_columns(scores, ["id", "n_response_tokens", *scorers])
    ids = table["id"].to_numpy()
    missing = set(kind_of) ^ set(ids.tolist())
    if missing:
        raise RuntimeError(f"audit scores and audit data disagree on {len(missing)} ids (e.g. {sorted(missing)[:3]})")
    kinds = np.array([kind_of[i] for i in ids.tolist()], dtype=object)
    rows = recovery_table(
        {s: table[s].to_numpy(zero_copy_only=False) for s in scorers},
        ids,
        table["n_response_tokens"].to_numpy(),
        kinds,
        list(ratios),
        list(audit.kinds),
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / RECOVERY_CSV).write_text(buffer.getvalue())
    (out / RECOVERY_TABLE).write_text(markdown(rows, audit.corrupt_fraction, invisible))
    ratio = headline_ratio(list(ratios))
    summary = {
        "rows": int(len(ids)),
        "planted": int(np.sum(~np.equal(kinds, None))),
        "planted_invisible": int(invisible),
        "corrupt_fraction": audit.corrupt_fraction,
        "headline_ratio": ratio,
        "headline": headline(rows, ratio),
        "recovery": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
    }
    (out / RECOVERY_JSON).write_text(json.dumps(summary, indent=2))
    return {k: summary[k] for k in ("rows", "planted", "planted_invisible", "headline")}
