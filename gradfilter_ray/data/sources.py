"""Finding input files and reading them as raw rows, through pyarrow's filesystem layer (local paths and URIs).

A raw row is (id, source_file, source_row, raw bytes of one JSON value). Reading never judges content: that is
`formats.normalize_batch`'s job, so that every row read is accounted for, kept or rejected. A file that cannot be
read at all raises `SourceError` naming the file. `rows_at_a_glance` is the cheap look at a file that the CLI takes
before Ray starts (preflight.py): the same errors, from a Parquet footer or the start of a file.
"""

from __future__ import annotations

import codecs
import fnmatch
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
GLOB_CHARS = "*?["


class SourceError(RuntimeError):
    """An input that cannot be read at all (or that holds nothing to do): one line naming the input and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Kept apart from `args`: Ray Data appends its retry advice to the args of an error raised in a read task.
        self.message = message

    def __str__(self) -> str:
        return self.message


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


@dataclass(frozen=True)
class Listing:
    files: list[SourceFile]
    skipped: list[str]  # what the listing left out, each as "path (why)"
    folder: str | None  # a folder read whole (a directory input, a `**` glob's base), as the user spells it


def list_sources(path: str, fmt: str) -> list[SourceFile]:
    return find_sources(path, fmt).files


def find_sources(path: str, fmt: str) -> Listing:
    """Expand a file, a glob or a directory into a sorted list of readable files (sorted -> stable ids). An existing
    path is taken as it is spelled, glob characters and all (on an object store, percent-encode them); a link back
    up the tree is not followed, and a file reached under two spellings is read once."""
    if not path:
        raise SourceError("data.path is empty: set it in the config or with --set data.path=...")
    fs, inner, prefix = resolve_filesystem(path)
    uri_of = (lambda p: prefix + p) if prefix else (lambda p: p)
    try:
        kind = fs.get_file_info(inner).type
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot reach input {path}: {exc}") from None
    folder = None
    if kind == pafs.FileType.File:
        candidates, skipped = [inner], []
    elif kind == pafs.FileType.Directory:
        found, skipped = _tree(fs, inner, None)
        candidates = [p for p in found if not _hidden(p) and _container(p, "auto")]
        folder = path
        if not candidates:
            raise SourceError(f"no input files in {path} (.json, .jsonl, .ndjson, .parquet, .pq, compressed or not)")
    elif any(ch in inner for ch in GLOB_CHARS):
        base, pattern = _glob_parts(inner)
        found, skipped = _tree(fs, base, None if "**" in pattern else len(pattern))
        candidates = [p for p in found if _glob_match(p[len(base) :].lstrip("/").split("/"), pattern)]
        folder = uri_of(base) if "**" in pattern else None
        if not candidates:
            raise SourceError(f"no input files match {path}")
    else:
        raise SourceError(f"input not found: {path}")
    if isinstance(fs, pafs.LocalFileSystem):
        candidates, twins = _one_spelling_each(candidates)
        skipped += twins
    files = []
    for p in candidates:
        container = _container(p, fmt)
        if container is None:
            raise SourceError(f"cannot tell the format of {uri_of(p)}: set data.format")
        files.append(SourceFile(index=len(files), path=p, uri=uri_of(p), container=container))
    return Listing(files, [f"{uri_of(p)} ({why})" for p, why in skipped], folder)


def _one_spelling_each(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Each file once, under the first of its spellings (links to one file, or one folder reached two ways), and
    the other spellings as left out."""
    kept, twins, seen = [], [], {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            twins.append((path, f"the same file as {seen[real]}"))
        else:
            seen[real] = path
            kept.append(path)
    return kept, twins


def _hidden(path: str) -> bool:
    return os.path.basename(path).startswith((".", "_"))


def _glob_parts(inner: str) -> tuple[str, list[str]]:
    """(the folder before the first component holding a glob character, the components from there on)."""
    parts = inner.split("/")
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in GLOB_CHARS))
    return "/".join(parts[:first]) or "/", parts[first:]


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """`glob`'s rules, component by component: `**` spans any number of folders; `*`, `?` and `[...]` stay inside
    one name and, like the shell, match a leading dot only when the pattern spells it."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1) if not _dotted(parts[:i]))
    if not parts or (parts[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _dotted(parts: list[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def _tree(fs: pafs.FileSystem, top: str, depth: int | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file under `top` at most `depth` names below it (None: any depth), sorted, and what was left out."""
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            infos = fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot list {top}: {exc}") from None
        files = [i.path for i in infos if i.is_file]
        if depth is not None:
            files = [p for p in files if p[len(top) :].strip("/").count("/") < depth]
        return sorted(files), []
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    # Links are followed (a folder of links to shards elsewhere is a corpus), except a link to a folder that holds
    # it (a cycle, walked forever otherwise): each folder carries the folders above it.
    stack: list[tuple[str, int, frozenset[tuple[int, int]]]] = [(top, 0, frozenset())]
    while stack:
        folder, level, above = stack.pop()
        try:
            status = os.stat(folder)
        except OSError:
            continue
        here = (status.st_dev, status.st_ino)
        if here in above:
            skipped.append((folder, "a link to a folder above it"))
            continue
        try:
            with os.scandir(folder) as entries:
                names = sorted(entries, key=lambda e: e.name, reverse=True)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SourceError(f"cannot list {folder}: {exc.strerror}") from None
        for entry in names:
            try:
                if entry.is_dir():
                    if depth is None or level + 2 <= depth:
                        stack.append((entry.path, level + 1, above | {here}))
                elif entry.is_file():
                    files.append(entry.path)
                elif entry.is_symlink():
                    skipped.append((entry.path, "a broken link"))
            except OSError as exc:
                skipped.append((entry.path, f"cannot be looked at: {exc.strerror}"))
    return sorted(files), sorted(skipped)


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
    records = _json_records(data, source.uri)
    for position, record in enumerate(records[:limit] if limit else records):
        try:
            raw = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape")
        except RecursionError:
            raw = UNSERIALISABLE  # not JSON: rejected as invalid_json, the row still accounted for
        yield position, raw


def _json_records(data: bytes, uri: str) -> list:
    """The records of a whole JSON list file (a blank file holds none)."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    # surrogateescape keeps undecodable bytes inside strings, so the offending rows can be rejected one by one.
    text = data.decode("utf-8", "surrogateescape")
    if not text.strip():
        return []
    try:
        records = json.loads(text, parse_constant=null_constant)
    except json.JSONDecodeError as exc:
        if _json_lines_start(text):
            raise SourceError(_JSON_LINES.format(uri=uri)) from None
        raise SourceError(f"{uri} is not a JSON list ({exc}); use .jsonl for JSON Lines") from None
    except RecursionError:
        raise SourceError(f"{uri}: JSON nested too deeply to parse; use .jsonl for JSON Lines") from None
    if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
        records = next(iter(records.values()))  # {"data": [...]} wrappers
    if not isinstance(records, list):
        raise SourceError(f"{uri}: expected a JSON list of records, got {type(records).__name__}")
    return records


_JSON_LINES = "{uri} holds JSON Lines (one record per line), not a JSON list: rename it to .jsonl"


def _json_lines_start(text: str) -> bool:
    """Whether `text` (a whole file or its start) opens as JSON Lines: a first line that is a whole JSON object,
    and more after it. No JSON document goes on after its one value, so such a file is never a JSON list."""
    first, newline, rest = text.lstrip().partition("\n")
    if not newline or not rest.strip():
        return False
    try:
        return isinstance(json.loads(first, parse_constant=null_constant), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _parquet_rows(fs: pafs.FileSystem, source: SourceFile, limit: int | None) -> Iterator[tuple[int, bytes]]:
    try:
        parquet = pq.ParquetFile(fs.open_input_file(source.path))
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri} as Parquet: {exc}") from None
    position = 0
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                if limit is not None and position >= limit:
                    return
                yield position, json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")
                position += 1
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri} as Parquet (at row {position}): {exc}") from None


READERS = {"jsonl": _jsonl_rows, "alpaca_json": _json_list_rows, "parquet": _parquet_rows}


# How much of a file a look before reading takes: a whole small file, or the start of a big one.
HEAD_BYTES = {"alpaca_json": 1 << 20, "jsonl": 64 << 10}


def rows_at_a_glance(fs: pafs.FileSystem, source: SourceFile) -> int | None:
    """The rows `source` holds when a cheap look tells (a Parquet footer, or the whole of a small JSON file), None
    when only reading it through would; raises `SourceError` when the look shows it cannot be read as its format."""
    if source.container == "parquet":
        return _parquet_footer_rows(fs, source)
    head, whole = _head(fs, source, HEAD_BYTES[source.container])
    if source.container == "jsonl":
        return sum(1 for line in head.removeprefix(codecs.BOM_UTF8).split(b"\n") if line.strip()) if whole else None
    if whole:
        return len(_json_records(head, source.uri))
    text = head.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape").lstrip()
    if _json_lines_start(text):
        raise SourceError(_JSON_LINES.format(uri=source.uri))
    if text and text[0] not in "[{":
        raise SourceError(f"{source.uri} is not a JSON list (it starts with {text[:20]!r})")
    return None


def _head(fs: pafs.FileSystem, source: SourceFile, size: int) -> tuple[bytes, bool]:
    """The first `size` bytes of the file (decompressed) and whether that is all of it."""
    chunks, held = [], 0
    with _open(fs, source) as stream:
        try:
            while held <= size and (chunk := stream.read(size + 1 - held)):
                chunks.append(chunk)
                held += len(chunk)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read {source.uri}: {exc}") from None
    head = b"".join(chunks)
    return head[:size], len(head) <= size


def _parquet_footer_rows(fs: pafs.FileSystem, source: SourceFile) -> int:
    try:
        with fs.open_input_file(source.path) as handle:
            if handle.size() < 12 or handle.read_at(4, 0) != b"PAR1":
                raise SourceError(f"{source.uri} is not a Parquet file (it does not start with PAR1)")
            return pq.ParquetFile(handle).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"cannot read {source.uri} as Parquet: {exc}") from None


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
