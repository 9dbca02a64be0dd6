"""The one place that spells output paths, commits stage outputs atomically and keeps manifest.json.

A stage writes everything into a private staging folder beside its final place, then `commit` renames each
output into place and only afterwards records the stage as done (with its key) in the manifest. A crash at any
point leaves either the old outputs or a stage that is not recorded as done, never a partial output taken for a
finished one.

When `output_dir` is an object-store URI (s3://, gs://), `root` is the driver's local working copy and the object
store is the run directory of record: `finish_stage` uploads a stage's outputs and only then writes the manifest
there (one PUT), `pull` starts a driver from the object store's manifest, and `ensure_local` downloads the outputs
of finished stages that the driver reads. Ray workers reach outputs through `shared`, never through `root`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradfilter_ray.storage import ObjectStore, Shared, default_work_dir, is_remote, local_path

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
MIRROR = ".mirror.json"  # which stage record each local copy of an output was downloaded or published under
SIDE_FILES = (".judge_cache.jsonl",)  # not stage outputs, but worth keeping with the run (paid-for judgements)


def _identity(record: dict[str, Any], skip_dirs: tuple[str, ...] = ()) -> str:
    identity = f"{record.get('key')}@{record.get('finished')}#{record.get('publication', '')}"
    return identity + (f"|without:{','.join(skip_dirs)}" if skip_dirs else "")


class RunDir:
    def __init__(self, output_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None) -> None:
        self.location = str(output_dir)
        self.store = ObjectStore(self.location) if is_remote(self.location) else None
        if self.store is None:
            self.root = local_path(self.location)
        else:
            self.root = Path(work_dir) if work_dir else default_work_dir(self.location)
        self._on_finish: list[Callable[[], None]] = []

    # ----- where every node reaches an output -----
    def shared(self, rel: str) -> Shared:
        """`rel` (e.g. "data", "selected/gsnr_0.1.parquet", ".ray_train") as a location any Ray worker opens."""
        if self.store is not None:
            return self.store.shared(rel)
        return Shared(str((self.root / rel).resolve()))

    def remove_shared(self, rel: str) -> None:
        if self.store is not None:
            self.store.delete(rel)
        path = self.root / rel
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    @contextmanager
    def worker_output(self, staged: Path, name: str) -> Iterator[Shared]:
        """Where Ray workers on any node write the output `name`; afterwards it lies in `staged/name` here."""
        if self.store is None:
            yield Shared(str((staged / name).resolve()))
            return
        scratch = f"{STAGING_PREFIX}{staged.name.removeprefix(STAGING_PREFIX)}"
        try:
            yield self.store.shared(f"{scratch}/{name}")
            try:
                self.store.download(f"{scratch}/{name}", staged / name)
            except FileNotFoundError:  # the workers wrote no rows
                (staged / name).mkdir(parents=True, exist_ok=True)
        finally:
            self.store.delete(scratch)

    # ----- output paths (fixed names other tools rely on) -----
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.parquet"

    @property
    def ensemble(self) -> Path:
        return self.root / "ensemble"

    def member_epoch(self, member: int, epoch: int) -> Path:
        return self.ensemble / f"member_{member}" / f"epoch_{epoch}"

    @property
    def ensemble_train_state(self) -> Path:
        """Ray Train's storage for the ensemble run (checkpoints used for resume)."""
        return self.root / ".ray_train"

    @property
    def gradients(self) -> Path:
        return self.root / "gradients"

    @property
    def selected(self) -> Path:
        return self.root / "selected"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def finetune_train_state(self) -> Path:
        """Ray Train's storage for the target fine-tuning runs (DeepSpeed checkpoints used for resume)."""
        return self.root / ".ray_train_finetune"

    @property
    def finetune_done(self) -> Path:
        """Subsets whose fine-tuning finished, held here until the stage commits (a crash keeps them)."""
        return self.root / ".finetune_done"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    # ----- manifest -----
    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        self._write_local(MANIFEST, text)
        if self.store is not None:
            self.store.write_text(MANIFEST, text)

    def _write_local(self, name: str, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.{uuid.uuid4().hex}"
        tmp.write_text(text)
        os.replace(tmp, self.root / name)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest().get("stages", {}).get(stage)

    def record_stage(self, stage: str, record: dict[str, Any]) -> None:
        manifest = self.read_manifest()
        manifest.setdefault("stages", {})[stage] = record
        self.write_manifest(manifest)

    def stage_done(self, stage: str, key: str) -> bool:
        record = self.stage_record(stage)
        return bool(record) and record.get("status") == "done" and record.get("key") == key

    # ----- atomic commit -----
    @contextmanager
    def staging(self, stage: str) -> Iterator[Path]:
        """A fresh private folder for a stage's outputs; removed afterwards whether or not it was committed."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{STAGING_PREFIX}{stage}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: Path, names: list[str]) -> None:
        """Move each named output from the staging folder into the run directory, replacing older versions."""
        self._forget(names)
        for name in names:
            src = staged / name
            if not src.exists():
                raise FileNotFoundError(f"stage output {name} was not produced in {staged}")
            dst = self.root / name
            old = None
            if dst.exists():
                old = self.root / f"{STAGING_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
                os.replace(dst, old)
            os.replace(src, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    def finish_stage(self, stage: str, outputs: list[str], record: dict[str, Any]) -> None:
        """Record a committed stage as done; on an object store, upload its outputs first.

        The object store's manifest first loses the stage's old record, then gets the new one after the last
        upload: a crash in between leaves a stage that is not done (and re-runs), never a half-replaced output
        recorded as finished.
        """
        if self.store is not None:
            # Every publication is told apart, even of the same record twice (`compare` republishes eval/).
            record = {**record, "publication": uuid.uuid4().hex[:12]}
            self.record_stage(stage, {"status": "publishing", "key": record.get("key")})
            for name in outputs:
                self.store.upload(self.root / name, name)
            for name in SIDE_FILES:
                if (self.root / name).exists():
                    self.store.upload(self.root / name, name)
            self._remember(outputs, _identity(record))
        self.record_stage(stage, record)
        callbacks, self._on_finish = self._on_finish, []
        for callback in callbacks:
            callback()

    def on_finish(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the running stage is recorded as done (e.g. drop what a re-run would need before)."""
        self._on_finish.append(callback)

    # ----- the driver's local copy of an object-store run directory -----
    def pull(self) -> None:
        """Start from the object store's manifest (a local copy left by an earlier driver is not trusted)."""
        if self.store is None:
            return
        self.store.ensure_exists()
        text = self.store.read_text(MANIFEST)
        self._write_local(MANIFEST, text if text is not None else "{}")
        for name in SIDE_FILES:
            self._merge_side_file(name)

    def _merge_side_file(self, name: str) -> None:
        """Union of the store's and the local lines (a cache of paid-for judgements: never lose either side's)."""
        remote_text = self.store.read_text(name)
        if remote_text is None:
            return
        remote = remote_text.splitlines()
        local_path_ = self.root / name
        local = local_path_.read_text().splitlines() if local_path_.exists() else []
        seen = set(remote)
        merged = remote + [line for line in local if line not in seen]
        self._write_local(name, "".join(line + "\n" for line in merged))

    def ensure_local(self, stage: str, skip_dirs: tuple[str, ...] = ()) -> None:
        """Make the driver's copy of a finished stage's outputs current (folders named in skip_dirs stay remote)."""
        if self.store is None:
            return
        record = self.stage_record(stage) or {}
        if record.get("status") != "done":
            raise RuntimeError(f"stage '{stage}' is not done in {self.location}: nothing to read from it")
        # A full copy serves a reader that skips folders; a copy without them does not serve one that needs them.
        accepted = (_identity(record), _identity(record, skip_dirs))
        mirror = self._mirror()
        for name in record.get("outputs", []):
            kept = mirror.get(name, {})
            # Trusted only when it was fetched under this very record and no file has gone missing or changed size
            # since (a cache cleaner, a hand edit): otherwise fetched again.
            if kept.get("id") in accepted and kept.get("files") == self._listing(name):
                continue
            path = self.root / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self.store.download(name, path, skip_dirs=skip_dirs)
            self._remember([name], _identity(record, skip_dirs))

    def _listing(self, name: str) -> dict[str, int] | None:
        path = self.root / name
        if path.is_file():
            return {"": path.stat().st_size}
        if not path.is_dir():
            return None
        return {p.relative_to(path).as_posix(): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}

    def _mirror(self) -> dict[str, dict]:
        try:
            return json.loads((self.root / MIRROR).read_text())
        except FileNotFoundError:
            return {}

    def _remember(self, names: list[str], identity: str) -> None:
        entries = {name: {"id": identity, "files": self._listing(name)} for name in names}
        self._write_local(MIRROR, json.dumps({**self._mirror(), **entries}, indent=2))

    def _forget(self, names: list[str]) -> None:
        if self.store is not None:
            mirror = self._mirror()
            self._write_local(MIRROR, json.dumps({k: v for k, v in mirror.items() if k not in names}, indent=2))

    def clean_stale_staging(self) -> int:
        """Remove staging folders left by an interrupted run; returns how many were removed."""
        removed = 0
        if self.store is not None:
            for name in self.store.top_level():
                if name.startswith(STAGING_PREFIX):
                    self.store.delete(name)
                    removed += 1
        if not self.root.exists():
            return removed
        stale = [p for p in self.root.iterdir() if p.name.startswith(STAGING_PREFIX)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return removed + len(stale)


class StageTimer:
    def __init__(self) -> None:
        self.started = time.time()

    def record(self, key: str, **counts: Any) -> dict[str, Any]:
        finished = time.time()
        return {
            "status": "done",
            "key": key,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "seconds": round(finished - self.started, 3),
            **counts,
        }
