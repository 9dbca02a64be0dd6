"""Ingest stage (Ray shell): input files -> canonical Parquet `data/` + `rejects.parquet`, every row accounted for.

Ray Data streams the files: one read task per file yields raw rows in batches, `normalize_batch` (pure) turns them
into canonical-or-rejected rows, and the result lands in a scratch folder as Parquet. A columnar pass
(`finalize.split_kept_rejected`, one Ray task) then removes exact duplicates and splits kept from rejected. Input
checksums are Ray tasks too: no corpus byte passes through the driver.

Every process's memory is bounded by a block or a file of normalized rows, never by an input file: Ray Data's blocks
are kept small (it would otherwise grow one up to 128 MiB), and the Parquet write runs as its own tasks, since
fused into the read task it would gather all of that task's blocks, i.e. a whole input file, before writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from gradfilter_ray.config import DataConfig
from gradfilter_ray.data.finalize import split_kept_rejected
from gradfilter_ray.data.formats import normalize_batch
from gradfilter_ray.data.sources import SourceError, SourceFile, list_sources, read_raw, resolve_filesystem
from gradfilter_ray.rundir import root_cause
from gradfilter_ray.runtime import IO_REMOTE_ARGS, run_as_task
from gradfilter_ray.storage import Location

# Measured at 3M rows (benchmarks/ingest_memory.py): with 8 MiB / 50k the workers peaked at 1.35x the 100k run,
# with these at 1.06x-1.15x.
NORMALIZED_BLOCK_BYTES = 4 << 20  # ~7k normalized Alpaca rows a block
NORMALIZED_ROWS_PER_FILE = 20_000  # a write task gathers this many rows (~12 MB): bounded memory, not too many files


def read_source_files(batch: pa.Table, filesystem_uri: str, limit: int | None):
    """Ray Data UDF: rows naming files -> those files' raw rows, streamed in batches (a generator)."""
    for row in batch.to_pylist():
        yield from read_raw(SourceFile(**row), filesystem_uri, limit)


def checksum(source: SourceFile, filesystem_uri: str) -> dict:
    """The file's SHA-256 and size as stored (a compressed file's own bytes, as `sha256sum` shows them)."""
    fs, _, _ = resolve_filesystem(filesystem_uri)
    digest = hashlib.sha256()
    size = 0
    try:
        with fs.open_input_stream(source.path, compression=None) as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri}: {exc}") from None
    return {"path": source.uri, "sha256": digest.hexdigest(), "bytes": size}


def ingest(cfg: DataConfig, data: Location, rejects: Location, scratch: Location) -> dict:
    """Write `data/` and `rejects.parquet` (every location reachable from every node); return counts and input
    checksums."""
    files, inputs = write_normalized(cfg, scratch / "normalized")
    counts = run_as_task(split_kept_rejected, scratch / "normalized", data, rejects, cfg.dedup)
    return {**counts, "files": files, "inputs": inputs}


def write_normalized(cfg: DataConfig, normalized: Location) -> tuple[int, list[dict]]:
    """Stream the input files through normalisation into Parquet at `normalized`; returns (files, checksums)."""
    import ray
    import ray.data

    files = list_sources(cfg.path, cfg.format)
    checksum_task = ray.remote(checksum).options(**IO_REMOTE_ARGS)
    inputs = ray.get([checksum_task.remote(f, cfg.path) for f in files])
    ds = ray.data.from_items([dataclasses.asdict(f) for f in files], override_num_blocks=len(files))
    ds.context.target_max_block_size = NORMALIZED_BLOCK_BYTES  # this dataset's own copy of the context
    ds = ds.map_batches(
        read_source_files,
        fn_kwargs={"filesystem_uri": cfg.path, "limit": cfg.limit},
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(normalize_batch, fn_kwargs={"max_chars": cfg.max_field_chars}, batch_format="pyarrow")
    with input_errors_left_to_the_caller():
        ds.write_parquet(
            normalized.path,
            filesystem=normalized.filesystem,
            min_rows_per_file=NORMALIZED_ROWS_PER_FILE,
            ray_remote_args=IO_REMOTE_ARGS,  # not the map's: different resources keep the write out of the read task
        )
    return len(files), inputs


# The loggers through which Ray Data reports a failed task (with its traceback) before raising the failure.
RAY_DATA_FAILURE_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


@contextmanager
def input_errors_left_to_the_caller() -> Iterator[None]:
    """Drop Ray Data's own reports of a read that raised `SourceError` (its traceback, twice, as an error in Ray's own
    code): the caller reports it, in one line. Every other failure keeps Ray Data's report."""
    loggers = [logging.getLogger(name) for name in RAY_DATA_FAILURE_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_an_input_error)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_an_input_error)


def _not_an_input_error(record: logging.LogRecord) -> bool:
    # Some of these records carry no exception of their own: they are logged while handling it.
    failure = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return failure is None or not isinstance(root_cause(failure), SourceError)
