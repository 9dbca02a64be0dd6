"""One storage path for every backend: a `Location` is a path plus the pyarrow filesystem that opens it.

A local folder, a shared mount and an object store (s3://, gs://, any URI pyarrow opens) go through the same code:
the driver and every Ray worker read and write `Location`s, which pickle, so they travel to workers as they are.
Object stores have no atomic rename, so "done" is never inferred from files being there: see `rundir.py`.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Credentials belong in the environment (or the node's role), never in a URI that manifests and logs repeat.
SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "sas_token", "account_key", "access_token")


class StorageError(ValueError):
    pass


def is_remote(output_dir: str) -> bool:
    """True for an object-store URI; a plain path and `file://` stay on the local filesystem."""
    scheme = urlsplit(output_dir).scheme
    return "://" in output_dir and scheme not in ("", "file")


def local_path(output_dir: str) -> Path:
    return Path(unquote(urlsplit(output_dir).path)) if output_dir.startswith("file://") else Path(output_dir)


def check_uri(output_dir: str) -> None:
    """Reject URIs that carry credentials (they would be written to the manifest and printed in logs), and
    mistyped ones that would otherwise quietly become a local folder (`s3:/bucket`)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/?(?!/)", output_dir):
        raise StorageError(f"output_dir: {output_dir!r} looks like a mistyped URI (scheme://bucket/prefix)")
    if not is_remote(output_dir):
        return
    parts = urlsplit(output_dir)
    if parts.username or parts.password:
        raise StorageError(
            "output_dir: the URI carries credentials (user:secret@); set them in the environment instead "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or the node's role)"
        )
    secret = sorted(set(parse_qs(parts.query)) & set(SECRET_QUERY_KEYS))
    if secret:
        raise StorageError(f"output_dir: the URI carries credentials ({', '.join(secret)}); use the environment")
    if not parts.netloc:
        raise StorageError(f"output_dir: {output_dir!r} names no bucket")


def open_location(output_dir: str) -> Location:
    """The Location of `output_dir`: a local path (made absolute: workers may run elsewhere) or a store URI."""
    import pyarrow.fs as pafs

    check_uri(output_dir)
    if not is_remote(output_dir):
        return Location(str(local_path(output_dir).resolve()), pafs.LocalFileSystem())
    fs, base = pafs.FileSystem.from_uri(output_dir)
    return Location(base.rstrip("/"), fs)


@dataclass(frozen=True)
class Location:
    """A file or folder any node of the cluster reaches. Paths of a local one are real paths (`os.fspath` works),
    so Python code that only ever sees local runs (tests, benchmarks) may hand it to plain file APIs."""

    path: str
    filesystem: object

    # ----- naming -----
    def __truediv__(self, rel: str | os.PathLike) -> Location:
        return Location(f"{self.path}/{os.fspath(rel)}", self.filesystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is on an object store: open it through its filesystem")
        return self.path

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.filesystem.type_name}://{self.path}"

    # ----- queries -----
    def _type(self):
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def files(self) -> list[str]:
        """Paths (relative to this folder, sorted) of every file under it; [""] for a file; [] when absent."""
        import pyarrow.fs as pafs

        kind = self._type()
        if kind == pafs.FileType.File:
            return [""]
        if kind == pafs.FileType.NotFound:
            return []
        prefix = self.path + "/"
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sorted(i.path[len(prefix) :] for i in found if i.type == pafs.FileType.File)

    def size(self) -> int:
        """Bytes this file or folder holds: a file's size, the sum of every file's under a folder (one listing),
        0 when absent."""
        import pyarrow.fs as pafs

        info = self.filesystem.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            return int(info.size)
        if info.type == pafs.FileType.NotFound:
            return 0
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        return sum(int(i.size) for i in found if i.type == pafs.FileType.File)

    def children(self) -> list[str]:
        import pyarrow.fs as pafs

        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in found)

    # ----- whole-object reads and writes -----
    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, payload: bytes) -> None:
        """Readers see the old object or the new one, never a mix: on a local disk a rename of a temporary file
        beside it; on an object store the single PUT does that by itself."""
        if not self.is_local:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(payload)
            return
        self.parent().make_dir()
        # A leading dot: Parquet folder readers (pyarrow, Ray Data) skip it, so a writer killed mid-write leaves no
        # half file that a later read of the folder would trip over.
        tmp = f"{self.parent().path}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def open_input(self):
        return self.filesystem.open_input_file(self.path)

    def writable(self) -> Location:
        """This location, its local parent folders made (object stores have no folders to create)."""
        if self.is_local:
            self.parent().make_dir()
        return self

    def open_output(self):
        self.writable()
        return self.filesystem.open_output_stream(self.path)

    # ----- folders -----
    def parent(self) -> Location:
        return Location(self.path.rsplit("/", 1)[0], self.filesystem)

    def make_dir(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        import pyarrow.fs as pafs

        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def put(self, local: Path) -> None:
        """Replace this file or folder with a local one (a folder's old files are removed first)."""
        import pyarrow.fs as pafs

        self.delete()
        self.parent().make_dir()
        if Path(local).is_dir() and self.is_local:  # copy_files creates no local folders
            for sub in [Path(local), *(p for p in Path(local).rglob("*") if p.is_dir())]:
                (self / sub.relative_to(local).as_posix()).make_dir()
        pafs.copy_files(str(local), self.path, destination_filesystem=self.filesystem)

    def get(self, local: Path) -> Path:
        """Copy this file or folder to `local` (e.g. a model folder onto a node's disk); returns `local`."""
        import pyarrow.fs as pafs

        if not self.exists():
            raise FileNotFoundError(f"{self} does not exist")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if not self.is_file():
            for sub in {Path(rel).parent for rel in self.files()}:
                (Path(local) / sub).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local), source_filesystem=self.filesystem)
        return Path(local)
