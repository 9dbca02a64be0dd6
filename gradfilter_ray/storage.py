"""Where a run directory lives when `output_dir` is an object-store URI (s3://, gs://, ...), through pyarrow.

The driver works on a local copy of the run directory and publishes each finished stage to the object store; Ray
workers on any node read their inputs from (and write their outputs to) the object store directly. Object stores
have no atomic rename, so "done" is never inferred from files being there: the manifest, a single object written
in one PUT after every output of a stage is uploaded, is the only record that a stage finished.
"""

from __future__ import annotations

import hashlib
import os
import re
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


def default_work_dir(output_dir: str) -> Path:
    """Under the user's cache, not the temp dir: temp cleaners remove old files one by one."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gradfilter-ray" / "runs" / hashlib.sha256(output_dir.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Shared:
    """A location every node of the cluster reaches: a path and the pyarrow filesystem to open it with (None =
    the local filesystem, i.e. a shared mount). Both pickle, so they travel to Ray workers as they are."""

    path: str
    filesystem: object | None = None


class ObjectStore:
    """The run directory on an object store: upload, download, delete and small-object reads and writes."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        check_uri(uri)
        self.uri = uri
        self.fs, base = pafs.FileSystem.from_uri(uri)
        self.base = base.rstrip("/")

    def ensure_exists(self) -> None:
        """Create the prefix (and, where the URI allows it, the bucket): a missing bucket or a missing permission
        fails here, before any work, with the store's own message."""
        try:
            self.fs.create_dir(self.base)
        except OSError as exc:
            raise StorageError(f"output_dir {self.uri}: cannot create or reach it: {exc}") from exc

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def shared(self, rel: str) -> Shared:
        return Shared(self.path(rel), self.fs)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self.path(rel)) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        # One PUT: readers see the old object or the new one, never a mix.
        with self.fs.open_output_stream(self.path(rel)) as stream:
            stream.write(text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        kind = self.fs.get_file_info(self.path(rel)).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def files(self, rel: str) -> list[str]:
        """Paths (relative to `rel`) of every file under `rel`; [rel's own name] when it is a single file."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.File:
            return [""]
        if info.type == pafs.FileType.NotFound:
            return []
        prefix = self.path(rel) + "/"
        found = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True))
        return sorted(i.path[len(prefix) :] for i in found if i.type == pafs.FileType.File)

    def upload(self, local: Path, rel: str) -> None:
        """Replace `rel` with the local file or folder. A folder's old objects are deleted first (no stale
        leftovers); a file is replaced by its one PUT, so readers see the old object or the new one."""
        import pyarrow.fs as pafs

        if local.is_dir() or self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory:
            self.delete(rel)
        pafs.copy_files(str(local), self.path(rel), destination_filesystem=self.fs)  # a folder: recursively

    def download(self, rel: str, local: Path, skip_dirs: tuple[str, ...] = ()) -> None:
        """Copy `rel` (a file or a folder) to `local`, leaving out folders named in `skip_dirs`."""
        import pyarrow.fs as pafs

        files = self.files(rel)
        if not files:
            raise FileNotFoundError(f"{self.uri}: {rel} does not exist")
        for sub in files:
            if skip_dirs and set(Path(sub).parts[:-1]) & set(skip_dirs):
                continue
            dest = local / sub if sub else local
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = self.path(f"{rel}/{sub}" if sub else rel)
            pafs.copy_files(src, str(dest), source_filesystem=self.fs)

    def top_level(self) -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.base, allow_not_found=True)
        return [i.base_name for i in self.fs.get_file_info(selector)]
