"""The run directory: where every output lives (one name each), and manifest.json, the only record of done.

Every stage reads and writes its outputs in place through `Location`s, the same code for a local folder, a shared
mount and an object store. The commit protocol needs no rename, so it holds on object stores too:
1. `begin_stage` replaces the stage's manifest record with "running" and the outputs it writes (so the stage is not
   done from here on) and removes its old outputs (a stage that resumes finished units keeps them: each unit carries
   its own marker);
2. the stage's Ray workers (bulk data) and the driver (small tables) write the outputs to their final places;
3. `finish_stage` writes the record "done" with the stage's key, last, in one whole-object write.
A crash anywhere before 3 leaves a stage that is not done and runs again; nothing else says a stage is done. A stage
that raises is recorded "failed" with the reason (`fail_stage`).

A stage only ever removes what this tool wrote there: an output path that exists while the manifest has no record of
the stage (a user's own `data/` folder in an `output_dir: .`) stops the stage before anything is touched.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gradfilter_ray.storage import Location, StorageError, open_location
from gradfilter_ray.units import member_unit

MANIFEST = "manifest.json"
WRITTEN_BY = "gradfilter-ray"  # in every manifest: a manifest.json without it (or older records) is not ours
GRADIENTS = "gradients"  # every config's extraction, each in its own folder named by its stage key
SCRATCH = ".scratch"  # per-stage intermediate files, removed when the stage ends (and by the next driver)
SCRATCH_NAME = re.compile(r"[a-z_]+-[0-9a-f]{8}")  # one stage's scratch folder (`RunDir.scratch`)
STAGE_KEY = re.compile(r"[0-9a-f]{16}")  # a stage key (`config.section_hash`): a folder of `gradients/` so named


class ForeignOutput(StorageError):
    """An output path holds something this tool did not write: it is refused, never removed."""


def read_stored_manifest(root: Location) -> dict[str, Any]:
    """The manifest as stored under `root` ({} when there is none yet)."""
    where = root / MANIFEST
    try:
        manifest = json.loads(where.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise StorageError(f"{where} is not a run manifest ({exc}): choose another output_dir") from None
    if not isinstance(manifest, dict):
        raise StorageError(f"{where} is not a run manifest (it holds a {type(manifest).__name__})")
    if not _is_ours(manifest):
        raise StorageError(f"{where} is not a run manifest this tool wrote: choose another output_dir")
    return manifest


def _is_ours(manifest: dict[str, Any]) -> bool:
    """Written by this tool: its stage records are records, and it says so, or (written before it said so) it holds
    the run's config hash or stage records."""
    stages = manifest.get("stages", {})
    if not isinstance(stages, dict) or not all(isinstance(r, dict) and "status" in r for r in stages.values()):
        return False
    return manifest.get("written_by") == WRITTEN_BY or "config_hash" in manifest or bool(stages)


def root_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, out of the wrappers Ray puts around it on its way to the driver."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    ray_data_exceptions = sys.modules.get("ray.data.exceptions")
    while True:
        if ray_exceptions and isinstance(exc, ray_exceptions.RayTaskError) and exc.cause is not None:
            exc = exc.cause
        elif ray_data_exceptions and isinstance(exc, ray_data_exceptions.UserCodeException) and exc.__cause__:
            exc = exc.__cause__
        else:
            return exc


def one_line(exc: BaseException) -> str:
    """An error's message on one line (some libraries' messages run over several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


class RunDir:
    def __init__(self, output_dir: str) -> None:
        self.location = str(output_dir)
        self.root = open_location(self.location)
        self._manifest: dict[str, Any] | None = None
        self.guard: Callable[[], None] = lambda: None  # raises when this driver may no longer write (driver_claim)

    def __getstate__(self) -> dict:
        # A copy sent to a Ray task reads and writes outputs; the driver's guard (and its claim) stays here.
        return {**self.__dict__, "guard": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, guard=lambda: None)

    def subdir(self, rel: str) -> RunDir:
        """A run directory of its own inside this one (its own manifest and stage records), written under this
        driver's claim: the audit's `audit/`."""
        inner = RunDir.__new__(RunDir)
        inner.location = f"{self.location.rstrip('/')}/{rel}"
        inner.root = self.root / rel
        inner._manifest = None
        inner.guard = lambda: self.guard()
        return inner

    def at(self, rel: str) -> Location:
        """`rel` (e.g. "data", "selection/gsnr_0.1.parquet") as a location any node opens."""
        return self.root / rel

    def ensure_exists(self) -> None:
        """Create the folder (and, where the URI allows it, the bucket): a missing bucket or permission fails here,
        before any work, with the store's own message."""
        from gradfilter_ray.storage import StorageError

        try:
            self.root.make_dir()
        except OSError as exc:
            raise StorageError(f"output_dir {self.location}: cannot create or reach it: {exc}") from exc

    # ----- output names (fixed: other tools rely on them) -----
    @property
    def data(self) -> Location:
        return self.at("data")

    @property
    def rejects(self) -> Location:
        return self.at("rejects.parquet")

    @property
    def tokens(self) -> Location:
        return self.at("tokens")

    @property
    def ensemble(self) -> Location:
        return self.at("ensemble")

    def member_folders(self) -> list[Location]:
        """Each ensemble member's folder, in member order, as the manifest's `ensemble` record maps the members of
        the config it was written for to their units (`units`: 'member_0' -> 'ensemble/member_seed42-<key>')."""
        units = (self.stage_record("ensemble") or {}).get("units") or {}
        missing = [m for m in range(len(units)) if member_unit(m) not in units]
        if not units or missing:
            raise StorageError(
                f"{self.location}: the manifest's ensemble record maps no members: run `ensemble` first"
            )
        return [self.at(units[member_unit(m)]) for m in range(len(units))]

    def member_epoch(self, member: int, epoch: int) -> Location:
        return self.member_folders()[member] / f"epoch_{epoch}"

    @property
    def ensemble_train_state(self) -> Location:
        """Ray Train's storage for the ensemble run (checkpoints used for resume)."""
        return self.at(".ray_train")

    @property
    def gradients(self) -> Location:
        """This config's extraction: the folder the manifest's `gradients` record maps (`units`: 'gradients' ->
        'gradients/<stage key>'; every config's extraction sits beside the others under its own stage key).
        `gradients/` itself when the record has no map and `gradients/` holds no stage key's folder: gradients
        written there directly (the tests' synthetic run directories, which record the stage done without a map).
        With keyed folders there and no map, which one is this config's is unknown (and `gradients/` read whole
        would mix every config's): a `StorageError` says to run `gradients`. A stage still running writes to
        `gradients_unit(key)`, never through this property."""
        units = (self.stage_record("gradients") or {}).get("units") or {}
        if "gradients" in units:
            return self.at(units["gradients"])
        top = self.at(GRADIENTS)
        if any(STAGE_KEY.fullmatch(name) for name in top.children()):
            raise StorageError(
                f"{self.location}: the manifest's gradients record maps no extraction folder among those in "
                f"{GRADIENTS}/: run `gradients` (or `run`) again"
            )
        return top

    @staticmethod
    def gradients_unit(key: str) -> str:
        """The extraction folder of the `gradients` stage key `key`, relative to the run directory."""
        return f"{GRADIENTS}/{key}"

    @property
    def scores(self) -> Location:
        return self.at("scoring/scores.parquet")

    @property
    def selection(self) -> Location:
        return self.at("selection")

    @property
    def finetune(self) -> Location:
        return self.at("finetune")

    @property
    def finetune_train_state(self) -> Location:
        """Ray Train's storage for the target fine-tuning runs (DeepSpeed checkpoints used for resume)."""
        return self.at(".ray_train_finetune")

    @property
    def evaluation(self) -> Location:
        return self.at("evaluation")

    @property
    def audit(self) -> Location:
        """The planted-noise audit: its own run directory (data, tokens, ensemble, gradients, scoring) and
        recovery.csv / .md / .json."""
        return self.at("audit")

    @property
    def judge_cache(self) -> Location:
        """Paid-for judgements, kept across re-runs of the evaluation stage (not a stage output)."""
        return self.at(".judge_cache.jsonl")

    # ----- manifest -----
    # One driver per output_dir (driver_claim.py), so after its first read the driver's copy is the manifest: it is
    # written through on every change and never read back from the store.
    def read_manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_stored_manifest(self.root)
        return copy.deepcopy(self._manifest)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.guard()
        manifest = {**manifest, "written_by": WRITTEN_BY}
        self.at(MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        self._manifest = copy.deepcopy(manifest)

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

    # ----- the commit protocol -----
    def begin_stage(self, stage: str, key: str, outputs: tuple[str, ...], keep_outputs: bool = False) -> None:
        self.check_outputs_ours(stage, outputs)
        self.record_stage(stage, {"status": "running", "key": key, "outputs": list(outputs)})
        if not keep_outputs:
            for rel in outputs:
                self.at(rel).delete()

    def check_outputs_ours(self, stage: str, outputs: tuple[str, ...]) -> None:
        """Raise `ForeignOutput` when one of the stage's output paths exists but the manifest has no record of this
        tool writing it (no record of the stage, none listing the path): it is someone else's, not to be replaced."""
        records = self.read_manifest().get("stages", {})
        ours = {rel for record in records.values() for rel in (record or {}).get("outputs") or []}
        for rel in outputs:
            if stage not in records and rel not in ours and self.at(rel).exists():
                raise ForeignOutput(
                    f"output_dir {self.location} already holds {rel!r}, which this tool did not write (its manifest "
                    f"has no record of it): move it away or choose another output_dir; it is left as it is"
                )

    # ----- units: the side-by-side outputs a stage's key references -----
    def add_references(self, stage: str, key: str, paths: list[str]) -> None:
        """Record that `stage` under `key` uses these unit outputs (paths relative to the run directory: a member's
        folder, a subset's model, a trainer's resumable state). Recorded before the work starts, so an interrupted
        unit is referenced too; `gc` removes only paths some record names and no kept key references."""
        manifest = self.read_manifest()
        by_key = manifest.setdefault("references", {}).setdefault(stage, {})
        merged = sorted(set(by_key.get(key, [])) | set(paths))
        if merged != by_key.get(key):
            by_key[key] = merged
            self.write_manifest(manifest)

    def references(self, stage: str | None = None, key: str | None = None) -> set[str]:
        """The unit paths recorded for `stage` under `key` (None: under every key, or of every stage)."""
        recorded = self.read_manifest().get("references", {})
        stages = [stage] if stage is not None else list(recorded)
        return {
            path
            for name in stages
            for k, paths in recorded.get(name, {}).items()
            if key is None or k == key
            for path in paths
        }

    def finish_stage(self, stage: str, record: dict[str, Any]) -> None:
        self.record_stage(stage, record)

    def fail_stage(self, stage: str, key: str, exc: BaseException) -> None:
        """Record that the stage stopped on `exc` (with the reason, and the outputs it may have begun writing). A stage
        that `begin_stage` refused never began: its record stays as it was (a record would claim its outputs)."""
        running = self.stage_record(stage) or {}
        if running.get("status") != "running" or running.get("key") != key:
            return
        cause = root_cause(exc)
        if not isinstance(exc, Exception):
            reason = "interrupted"
        elif type(cause).__module__.startswith("gradfilter_ray."):
            reason = one_line(cause)  # this tool's own errors say what they are
        else:
            reason = f"{type(cause).__name__}: {one_line(cause)}"
        record = {"status": "failed", "key": key, "reason": reason, "outputs": running.get("outputs", [])}
        record["failed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.record_stage(stage, record)
        except Exception:  # noqa: BLE001 - a store or claim that refuses the record must not hide the failure itself
            pass

    @contextmanager
    def scratch(self, stage: str) -> Iterator[Location]:
        """A fresh folder for a stage's intermediate files, on the same storage (so workers on any node reach it);
        removed afterwards whether or not the stage finished."""
        where = self.at(f"{SCRATCH}/{stage}-{uuid.uuid4().hex[:8]}")
        try:
            yield where
        finally:
            where.delete()

    def clean_scratch(self) -> int:
        """Remove scratch folders left by a killed driver (one driver per output_dir: none is in use); only the
        folders `scratch` makes (stage-xxxxxxxx), so anything else a user keeps in `.scratch/` stays."""
        stale = self.at(SCRATCH)
        left = [n for n in stale.children() if SCRATCH_NAME.fullmatch(n)] if stale.exists() else []
        for name in left:
            (stale / name).delete()
        if stale.exists() and not stale.children():
            stale.delete()
        return len(left)


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
