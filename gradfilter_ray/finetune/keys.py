"""A fine-tuned subset's key and its trainer's name (pure: no Ray, no I/O): what its training computes from, and
nothing else.

The key hashes the keyed `finetune` fields (the base model, the recipe, the resolved rows per optimiser step and
dtype) less the ones that only pick which subsets exist (`scorers`, `ratios`, `full`), and a digest of the rows the
subset trains on: their ids and text columns, in the order the training reads them. Adding a ratio or a scorer
leaves every existing subset's key alone; a change to the recipe, the base model or a subset's rows gives it a new
one (and a folder of its own, `finetune/{name}-{key}/`).

The digest streams: it is fed one record batch at a time and does not depend on how the rows are cut into batches
or files, so it costs one read of the text columns and constant memory whatever the subset's size.

A subset's trainer (its resumable state under `.ray_train_finetune/`: each rank's token share and the DeepSpeed
checkpoints) depends on more than the key: on how many ranks share the subset, the ZeRO stage and where the
optimiser steps. `trainer_name` adds a short hash of those to the key, so a subset trained again at another shape
starts in a trainer of its own, from its first step, instead of resuming state it cannot load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradfilter_ray.config import Config, keyed_value, section_hash

SUBSET_CHOICE = ("scorers", "ratios", "full")  # which subsets exist, not how any one of them is trained


def digest_columns() -> list[str]:
    """The columns the digest reads: what the training tokenises (`data.tokenized.TEXT_COLUMNS`, the ids and every
    text column), so a text column added there is digested too."""
    from gradfilter_ray.data.tokenized import TEXT_COLUMNS  # here: that module loads torch, which drivers do without

    return list(TEXT_COLUMNS)


def training_fields(cfg: Config) -> dict:
    """The finetune fields that change a subset's trained model."""
    return {k: v for k, v in keyed_value(cfg, "finetune").items() if k not in SUBSET_CHOICE}


def subset_key(cfg: Config, rows_digest: str) -> str:
    """A subset's key: its training fields and the digest of its rows (`RowsDigest`)."""
    return section_hash("finetune-subset", training_fields(cfg), rows_digest)


def trainer_state_fields(cfg: Config) -> dict:
    """What a subset trainer's resumable state depends on beyond the subset's key (which holds the micro-batch size
    and the rows per step already): the ranks (each one's token share, DeepSpeed's partitioning), the ZeRO stage,
    the optimiser's placement and kind (a checkpoint loads only into the same), and whether it trains on GPUs."""
    t = cfg.finetune
    return {
        "num_workers": t.num_workers,
        "zero_stage": t.zero_stage,
        "offload_optimizer": t.offload_optimizer,
        "cpu_adam": t.cpu_adam if t.offload_optimizer else None,  # only the offloaded step uses it
        "on_gpu": t.gpus_per_worker > 0,
    }


def trainer_name(cfg: Config, key: str, name: str) -> str:
    """The Ray Train run of the subset `name` with key `key` under `.ray_train_finetune/`:
    `finetune-{key}-{8 hex of trainer_state_fields}-{name}`. A re-run at the same shape resumes from it; at another
    shape it names a fresh trainer."""
    shape = section_hash("finetune-trainer", trainer_state_fields(cfg))[:8]
    return f"finetune-{key}-{shape}-{name}"


class _ColumnDigest:
    """One column's values as two streams (each value's length, -1 for null; then the values' bytes back to back):
    fed batch by batch, the same stream whatever the batch boundaries."""

    def __init__(self) -> None:
        self.rows = 0
        self.lengths = hashlib.sha256()
        self.values = hashlib.sha256()

    def update(self, column: pa.Array | pa.ChunkedArray) -> None:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        for chunk in chunks:
            self.rows += len(chunk)
            if pa.types.is_integer(chunk.type):
                ids = pc.fill_null(chunk.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
                self.values.update(ids.astype("<i8").tobytes())
                self.lengths.update(chunk.is_null().to_numpy(zero_copy_only=False).tobytes())
                continue
            self._update_text(chunk.cast(pa.large_string()))

    def _update_text(self, text: pa.Array) -> None:
        valid = text.is_valid().to_numpy(zero_copy_only=False)
        if text.null_count:
            text = pc.fill_null(text, "")  # a null slot's bytes are unspecified in Arrow: hash none
        offsets = np.frombuffer(text.buffers()[1], dtype="<i8")[text.offset : text.offset + len(text) + 1]
        lengths = np.diff(offsets)
        lengths[~valid] = -1
        self.lengths.update(lengths.astype("<i8").tobytes())
        start, stop = int(offsets[0]), int(offsets[-1])
        if stop > start:
            self.values.update(text.buffers()[2].slice(start, stop - start))

    def summary(self) -> list:
        return [self.rows, self.lengths.hexdigest(), self.values.hexdigest()]


class RowsDigest:
    """The digest of a subset's rows: `update` with each record batch (or table) in reading order, then `hexdigest`.
    Only `digest_columns` count (metadata and score columns do not); a column absent from the rows counts as
    absent."""

    def __init__(self) -> None:
        self._names = digest_columns()
        self._columns: dict[str, _ColumnDigest] = {}

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        for name in self._names:
            if name in batch.schema.names:
                self._columns.setdefault(name, _ColumnDigest()).update(batch.column(name))

    def hexdigest(self) -> str:
        summary = {name: self._columns[name].summary() for name in self._names if name in self._columns}
        return section_hash("finetune-rows", summary)


def rows_digest(batches: Iterable[pa.RecordBatch | pa.Table]) -> str:
    digest = RowsDigest()
    for batch in batches:
        digest.update(batch)
    return digest.hexdigest()
