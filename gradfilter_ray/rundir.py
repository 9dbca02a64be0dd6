"""The one place that spells output paths, commits stage outputs atomically and keeps manifest.json.

A stage writes everything into a private staging folder beside its final place, then `commit` renames each
output into place and only afterwards records the stage as done (with its key) in the manifest. A crash at any
point leaves either the old outputs or a stage that is not recorded as done, never a partial output taken for a
finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

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
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{MANIFEST}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.manifest_path)

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

    def clean_stale_staging(self) -> int:
        """Remove staging folders left by an interrupted run; returns how many were removed."""
        if not self.root.exists():
            return 0
        stale = [p for p in self.root.iterdir() if p.name.startswith(STAGING_PREFIX)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return len(stale)


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
