"""The look at a run's inputs before Ray starts: what the data stage would trip over, found in a second instead of
after Ray's start-up, with nothing touched (it runs before the run directory is created or claimed).

The input files exist and look like their format (a cheap look: a Parquet footer, the start of a big JSON file, the
whole of a small one), they hold rows, no input lies inside output_dir and output_dir does not lie inside an input
folder. A problem that only reading a file through shows (a truncated .gz) surfaces from inside Ray as the same
one-line `SourceError` when the data stage reads it. (What the run directory must hold for the stages to run, the
stage table checks: `pipeline.check_ready`.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import Config
from gradfilter_ray.data.sources import SourceError, find_sources, resolve_filesystem, rows_at_a_glance
from gradfilter_ray.data.stage import nothing_to_do
from gradfilter_ray.rundir import RunDir, read_stored_manifest
from gradfilter_ray.storage import is_remote, local_path

# An object store that does not answer (no network, a wrong endpoint, a credential lookup that hangs) would keep
# the S3 client retrying for minutes; the look at remote inputs gives up after this long.
REMOTE_LOOK_S = 30.0
# How many files the look opens (the rest are only listed): every local shard costs a read, every remote one a
# round trip.
FILES_LOOKED_AT = {"local": 256, "remote": 8}


@dataclass(frozen=True)
class Look:
    files: list[str]  # the input files, as the user would spell them
    rows: int | None  # the rows they hold, when the look could tell
    skipped: list[str]  # what the listing left out, each "path (why)"
    folder: str | None  # a folder the listing walked through (a directory input, a `**` glob's base)


def check_inputs(cfg: Config, run: RunDir, data_key: str, force: bool = False) -> list[str]:
    """Refuse (`SourceError`) inputs the data stage (key `data_key`) would fail on, when it is to run; notes for the
    user (what the listing left out)."""
    record = read_stored_manifest(run.root).get("stages", {}).get("data") or {}
    if not force and record.get("status") == "done" and record.get("key") == data_key:
        return []
    try:
        path = resolve(cfg.data.path)
    except ValueError as exc:
        raise SourceError(f"data.path: {exc}") from None
    output = _place(cfg.output_dir)
    _refuse_input_in_output(path, cfg.output_dir, output)
    look = _look_remote(path, cfg.data.format) if is_remote(path) else look_at_inputs(path, cfg.data.format)
    for uri in look.files:
        if _within(_place(uri), output):
            raise SourceError(f"input {uri} lies inside output_dir {cfg.output_dir}: {_MOVE}")
    if look.folder and _within(output, _place(look.folder)):
        folder = "the input folder" if look.folder == path else f"{cfg.data.path}'s folder"
        raise SourceError(
            f"output_dir {cfg.output_dir} lies inside {folder} {look.folder}: the run's own outputs would be read "
            "back as input; choose an output_dir outside it"
        )
    if look.rows == 0:
        raise SourceError(nothing_to_do(cfg.data.path, len(look.files)))
    return [f"data.path {cfg.data.path}: left out {item}" for item in look.skipped]


def look_at_inputs(path: str, fmt: str, remote: bool = False) -> Look:
    """List the inputs and look at each (the first FILES_LOOKED_AT of them)."""
    listing = find_sources(path, fmt)
    fs, _, _ = resolve_filesystem(path)
    looked_at = listing.files[: FILES_LOOKED_AT["remote" if remote else "local"]]
    rows: int | None = 0 if len(looked_at) == len(listing.files) else None
    for source in looked_at:
        held = rows_at_a_glance(fs, source)
        rows = None if rows is None or held is None else rows + held
    return Look([f.uri for f in listing.files], rows, listing.skipped, listing.folder)


_MOVE = "a stage replaces what it writes there; move the input out or choose another output_dir"


def _refuse_input_in_output(path: str, output_dir: str, output: tuple[str, str]) -> None:
    if _place(path) == output:
        raise SourceError(f"data.path {path} is output_dir itself: give the run an output_dir of its own")
    if _within(_place(_fixed_prefix(path)), output):
        raise SourceError(f"data.path {path} lies inside output_dir {output_dir}: {_MOVE}")


def _fixed_prefix(path: str) -> str:
    """The part of a glob before its first component with a glob character (the path itself when it has none)."""
    parts = path.split("/")
    for position, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:position]) or "/"
    return path


def _place(path: str) -> tuple[str, str]:
    """Where `path` is, comparable with another place: (the store, the path in it); a local path made real."""
    if is_remote(path):
        parts = urlsplit(path)
        return f"{parts.scheme}://{parts.netloc}", "/" + parts.path.strip("/")
    return "", os.path.realpath(local_path(path))


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    """Whether `inner` is `outer` or lies below it."""
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


def _look_remote(path: str, fmt: str) -> Look:
    """`look_at_inputs` in a child process, killed after REMOTE_LOOK_S: an object-store client cannot be stopped
    from another thread, and an interpreter exits only once its requests have ended."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from gradfilter_ray.preflight import _look_and_print; _look_and_print(*sys.argv[1:])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, path, fmt], capture_output=True, text=True, timeout=REMOTE_LOOK_S, env=env
        )
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"no answer from {path} within {REMOTE_LOOK_S:.0f} s: check the network, the endpoint and the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, or the node's role)"
        ) from None
    answer = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
    if not answer:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourceError(f"cannot look at {path}: {last}")
    reply = json.loads(answer[0])
    if "error" in reply:
        raise SourceError(reply["error"])
    return Look(**reply)


def _look_and_print(path: str, fmt: str) -> None:
    try:
        reply = asdict(look_at_inputs(path, fmt, remote=True))
    except SourceError as exc:
        reply = {"error": str(exc)}
    print(json.dumps(reply))
