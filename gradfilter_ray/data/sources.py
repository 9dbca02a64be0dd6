"""Finding input files and reading them as raw rows, through pyarrow's filesystem layer (local paths and URIs).

A raw row is (id, source_file, source_row, raw bytes of one JSON value). Reading never judges content: that is
`formats.normalize_batch`'s job, so that every row read is accounted for, kept or rejected. A file that cannot be
read at all raises `SourceError` naming the file.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradfilter_ray.data.formats import RAW_SCHEMA, ROW_ID_FILE_STRIDE, null_constant

SUFFIXES = {
    ".json": "alpaca_json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
UNSERIALISABLE = b"<record nested too deeply to re-serialise>"


class SourceError(RuntimeError):
    """An input that cannot be read at all."""


@dataclass(frozen=True)
class SourceFile:
    index: int
    path: str  # as pyarrow's filesystem spells it
    uri: str  # as the user would spell it (for messages and provenance)
    container: str  # alpaca_json | jsonl | parquet


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _container(name: str, fmt: str) -> str | None:
    if fmt == "parquet" or fmt == "jsonl":
        return fmt
    if fmt in ("alpaca_json", "sharegpt"):
        stem = _strip_compression(name)
        return "jsonl" if stem.endswith((".jsonl", ".ndjson")) else "alpaca_json"
    return SUFFIXES.get(os.path.splitext(_strip_compression(name))[1].lower())


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix to rebuild a user-facing URI)."""
    if "://" in path:
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise SourceError(f"cannot open input URI {path}: {exc}") from None
        return fs, inner, path[: path.index("://") + 3]
    return pafs.LocalFileSystem(), os.path.abspath(path), ""


def list_sources(path: str, fmt: str) -> list[SourceFile]:
    """Expand a file, a glob or a directory into a sorted list of readable files (sorted -> stable ids)."""
    if not path:
        raise SourceError("data.path is empty: set it in the config or with --set data.path=...")
    fs, inner, prefix = resolve_filesystem(path)
    uri_of = (lambda p: prefix + p) if prefix else (lambda p: p)
    if any(ch in inner for ch in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            candidates = sorted(glob.glob(inner, recursive=True))
        else:
            base = inner.split("*")[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            candidates = sorted(i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, inner))
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"input not found: {path}")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            candidates = sorted(
                i.path for i in infos if i.is_file and not os.path.basename(i.path).startswith((".", "_"))
            )
            candidates = [c for c in candidates if _container(c, "auto")]
        else:
            candidates = [inner]
    files = []
    for p in candidates:
        container = _container(p, fmt)
        if container is None:
            raise SourceError(f"cannot tell the format of {uri_of(p)}: set data.format")
        files.append(SourceFile(index=len(files), path=p, uri=uri_of(p), container=container))
    if not files:
        raise SourceError(f"no input files match {path}")
    return files


def _raw_table(source: SourceFile, positions: list[int], raws: list[bytes]) -> pa.Table:
    base = source.index * ROW_ID_FILE_STRIDE
    return pa.Table.from_pydict(
        {
            "id": [base + p for p in positions],
            "source_file": [source.uri] * len(positions),
            "source_row": positions,
            "raw": raws,
        },
        schema=RAW_SCHEMA,
    )


def _open(fs: pafs.FileSystem, source: SourceFile):
    try:
        return fs.open_input_stream(source.path, compression="detect")
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri}: {exc}") from None


def _lines(stream, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    pending = b""
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        pieces = (pending + chunk).split(b"\n")
        pending = pieces.pop()
        yield from pieces
    if pending:
        yield pending


def _jsonl_rows(fs: pafs.FileSystem, source: SourceFile, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes) for every non-blank line; blank lines carry no row."""
    count = 0
    with _open(fs, source) as stream:
        try:
            for lineno, line in enumerate(_lines(stream)):
                if limit is not None and count >= limit:
                    return
                if lineno == 0 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8) :]  # a byte-order mark is not part of the first row
                if not line.strip():
                    continue
                count += 1
                yield lineno, line.rstrip(b"\r")
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read {source.uri}: {exc}") from None


def _json_list_rows(fs: pafs.FileSystem, source: SourceFile, limit: int | None) -> Iterator[tuple[int, bytes]]:
    with _open(fs, source) as stream:
        try:
            data = stream.read()
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read {source.uri}: {exc}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    # surrogateescape keeps undecodable bytes inside strings, so the offending rows can be rejected one by one.
    text = data.decode("utf-8", "surrogateescape")
    try:
        records = json.loads(text, parse_constant=null_constant)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{source.uri} is not a JSON list ({exc}); use .jsonl for JSON Lines") from None
    except RecursionError:
        raise SourceError(f"{source.uri}: JSON nested too deeply to parse; use .jsonl for JSON Lines") from None
    if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
        records = next(iter(records.values()))  # {"data": [...]} wrappers
    if not isinstance(records, list):
        raise SourceError(f"{source.uri}: expected a JSON list of records, got {type(records).__name__}")
    for position, record in enumerate(records[:limit] if limit else records):
        try:
            raw = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape")
        except RecursionError:
            raw = UNSERIALISABLE  # not JSON: rejected as invalid_json, the row still accounted for
        yield position, raw


def _parquet_rows(fs: pafs.FileSystem, source: SourceFile, limit: int | None) -> Iterator[tuple[int, bytes]]:
    try:
        parquet = pq.ParquetFile(fs.open_input_file(source.path))
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri} as Parquet: {exc}") from None
    position = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            if limit is not None and position >= limit:
                return
            yield position, json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")
            position += 1


READERS = {"jsonl": _jsonl_rows, "alpaca_json": _json_list_rows, "parquet": _parquet_rows}


def read_raw(source: SourceFile, filesystem_uri: str, limit: int | None, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """Stream one file as RAW_SCHEMA tables of at most `batch_rows` rows."""
    fs, _, _ = resolve_filesystem(filesystem_uri)
    positions: list[int] = []
    raws: list[bytes] = []
    for position, raw in READERS[source.container](fs, source, limit):
        positions.append(position)
        raws.append(raw)
        if len(positions) >= batch_rows:
            yield _raw_table(source, positions, raws)
            positions, raws = [], []
    if positions:
        yield _raw_table(source, positions, raws)
