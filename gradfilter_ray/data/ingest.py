"""Ingest stage (Ray shell): input files -> canonical Parquet `data/` + `rejects.parquet`, every row accounted for.

Ray Data streams the files: one read task per file yields raw rows in batches, `normalize_batch` (pure) turns them
into canonical-or-rejected rows, and the result lands in the stage's staging folder as Parquet. A columnar pass
(`finalize.split_kept_rejected`) then removes exact duplicates and splits kept from rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pyarrow as pa

from gradfilter_ray.config import DataConfig
from gradfilter_ray.data.finalize import split_kept_rejected
from gradfilter_ray.data.formats import normalize_batch
from gradfilter_ray.data.sources import SourceFile, list_sources, read_raw, resolve_filesystem
from gradfilter_ray.storage import Shared


def read_source_files(batch: pa.Table, filesystem_uri: str, limit: int | None):
    """Ray Data UDF: rows naming files -> those files' raw rows, streamed in batches (a generator)."""
    for row in batch.to_pylist():
        yield from read_raw(SourceFile(**row), filesystem_uri, limit)


def checksum(source: SourceFile, filesystem_uri: str) -> dict:
    fs, _, _ = resolve_filesystem(filesystem_uri)
    digest = hashlib.sha256()
    size = 0
    with fs.open_input_stream(source.path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"path": source.uri, "sha256": digest.hexdigest(), "bytes": size}


def run(cfg: DataConfig, staged: Path) -> dict:
    """Write `staged/data/` and `staged/rejects.parquet` (staged reachable from every node); return counts and
    input checksums. The pipeline's shell calls the two halves itself, to route the Ray workers' writes."""
    files, inputs = write_normalized(cfg, Shared(str(staged / "normalized")))
    return finalize(cfg, staged, files, inputs)


def finalize(cfg: DataConfig, staged: Path, files: int, inputs: list[dict]) -> dict:
    counts = split_kept_rejected(staged / "normalized", staged / "data", staged / "rejects.parquet", dedup=cfg.dedup)
    return {**counts, "files": files, "inputs": inputs}


def write_normalized(cfg: DataConfig, normalized: Shared) -> tuple[int, list[dict]]:
    """Stream the input files through normalisation into Parquet at `normalized`; returns (files, checksums)."""
    import ray.data

    files = list_sources(cfg.path, cfg.format)
    inputs = [checksum(f, cfg.path) for f in files]
    ds = ray.data.from_items([dataclasses.asdict(f) for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(
        read_source_files,
        fn_kwargs={"filesystem_uri": cfg.path, "limit": cfg.limit},
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(normalize_batch, fn_kwargs={"max_chars": cfg.max_field_chars}, batch_format="pyarrow")
    ds.write_parquet(normalized.path, filesystem=normalized.filesystem)
    return len(files), inputs
