"""Reclaiming space (`gradfilter-ray gc`): remove the unit outputs that none of the kept configs references.

A run directory holds the unit outputs of every config run in it side by side (`<name>-<key>` folders, Ray Train
state), and its manifest records, per stage and stage key, the paths each key uses (`RunDir.add_references`). `gc`
keeps every path a stage key of the kept configs references and removes the other recorded paths: only paths the
manifest proves this tool wrote, so a user's own file beside them is never touched. The audit's run directory
(`audit/`) has its own manifest and keys and is planned the same way.

A stage record left "done" over units `gc` removed would make the next run of its config skip the stage: `collect`
marks every done record whose key references a removed path "collected" (not done; the record and the outputs it
lists stay), so that run redoes the stage, which redoes only the missing units.

`removable` is the rule (paths only, no I/O); `plan` reads the manifests and measures what the rule removes;
`collect` removes it, drops every recorded path that no longer exists from the manifests and marks the records it
affected (`collected_records`, pure).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gradfilter_ray import pipeline
from gradfilter_ray.config import Config
from gradfilter_ray.rundir import RunDir

AUDIT = "audit"  # the audit's own run directory, relative to the run's


@dataclass(frozen=True)
class Plan:
    remove: dict[str, int]  # path relative to the run directory -> the bytes it holds
    keep: tuple[str, ...]  # the recorded paths the kept configs reference
    held: int | None = None  # bytes of every recorded path that exists (None: not measured)

    @property
    def freed(self) -> int:
        return sum(self.remove.values())


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it."""
    return path == folder or path.startswith(folder + "/")


def outermost(paths: Iterable[str]) -> list[str]:
    """The paths not inside another of them, sorted (so nested paths count their bytes once)."""
    unique = set(paths)
    return sorted(p for p in unique if not any(q != p and inside(p, q) for q in unique))


def removable(recorded: Iterable[str], kept: Iterable[str]) -> list[str]:
    """The recorded paths to remove: those neither inside a kept path nor holding one, outermost only (a path
    inside another removed one goes with it), sorted."""
    kept = set(kept)
    return outermost(p for p in recorded if not any(inside(p, k) or inside(k, p) for k in kept))


def _recorded_path(path: str) -> str | None:
    """A recorded path as a path inside the run directory; None for one that would leave it or name all of it."""
    parts = [part for part in str(path).split("/") if part not in ("", ".")]
    return "/".join(parts) if parts and ".." not in parts else None


def stage_keys(cfg: Config) -> dict[str, dict[str, str]]:
    """`cfg`'s stage -> key, per run directory: "" the run's own, `AUDIT` the audit's (its planted sample's key
    stands for `data`)."""
    return {
        "": {name: pipeline.stage_key(name, cfg) for name in pipeline.STAGES},
        AUDIT: pipeline.audit_stage_keys(cfg),
    }


def _run_dirs(run: RunDir) -> list[tuple[str, RunDir]]:
    return [("", run), (AUDIT, run.subdir(AUDIT))]


def _in_run(where: str, path: str) -> str | None:
    rel = _recorded_path(path)
    return None if rel is None else f"{where}/{rel}" if where else rel


def _relative_to(where: str, paths: Iterable[str]) -> list[str]:
    """The paths (relative to the run directory) inside the run directory `where`, relative to it."""
    return list(paths) if not where else [p[len(where) + 1 :] for p in paths if p.startswith(f"{where}/")]


def referenced(run: RunDir, configs: Iterable[Config]) -> tuple[set[str], set[str]]:
    """(every path the manifests record, the paths the configs' stage keys reference), relative to `run`."""
    keys = [stage_keys(cfg) for cfg in configs]
    recorded: set[str] = set()
    kept: set[str] = set()
    for where, inner in _run_dirs(run):
        recorded |= {_in_run(where, p) for p in inner.references()}
        for by_stage in keys:
            for stage, key in by_stage[where].items():
                kept |= {_in_run(where, p) for p in inner.references(stage, key)}
    return recorded - {None}, kept - {None}


def plan(run: RunDir, configs: Iterable[Config], measure_held: bool = False) -> Plan:
    """What `collect` removes for these kept configs, each path with its bytes (one listing per path); with
    `measure_held`, also the bytes every recorded path holds."""
    recorded, kept = referenced(run, configs)
    remove = {}
    for path in removable(recorded, kept):
        where = run.at(path)
        if where.exists():
            remove[path] = where.size()
    held = None
    if measure_held:
        held = sum(remove[p] if p in remove else run.at(p).size() for p in outermost(recorded))
    return Plan(remove, tuple(sorted(kept)), held)


def collected_records(manifest: dict, removed: Iterable[str]) -> dict[str, dict]:
    """The manifest's done stage records whose key references a removed path (the path itself, one inside it or one
    holding it; paths relative to the manifest's run directory), each as it becomes: the same record (its key and
    outputs kept), "collected", with the reason."""
    removed = sorted(set(removed))
    references = manifest.get("references") or {}
    collected = {}
    for stage, record in (manifest.get("stages") or {}).items():
        if (record or {}).get("status") != "done":
            continue
        used = [rel for p in (references.get(stage) or {}).get(record.get("key"), []) if (rel := _recorded_path(p))]
        gone = [p for p in removed if any(inside(p, u) or inside(u, p) for u in used)]
        if gone:
            shown = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
            reason = f"gc removed unit outputs it references ({shown}): its next run redoes them"
            collected[stage] = {**record, "status": "collected", "reason": reason}
    return collected


def collect(run: RunDir, planned: Plan) -> None:
    """Remove the planned paths, mark every done stage record whose key referenced one of them "collected" (not
    done: the next run of its config redoes its missing units), then drop every recorded path that no longer exists
    from the manifests (written through the run's claim, like every manifest change)."""
    for path in planned.remove:
        run.at(path).delete()
    for where, inner in _run_dirs(run):
        manifest = inner.read_manifest()
        stages = manifest.get("stages") or {}
        marked = {**stages, **collected_records(manifest, _relative_to(where, planned.remove))}
        recorded = manifest.get("references") or {}
        existing: dict[str, dict[str, list[str]]] = {}
        for stage, by_key in recorded.items():
            for key, paths in by_key.items():
                there = [p for p in paths if (rel := _recorded_path(p)) is not None and inner.at(rel).exists()]
                if there:
                    existing.setdefault(stage, {})[key] = there
        if existing != recorded or marked != stages:
            manifest["references"] = existing
            if marked:
                manifest["stages"] = marked
            inner.write_manifest(manifest)


def human(size: int) -> str:
    """512 -> '512 B', 1288490188 -> '1.2 GiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plan_lines(planned: Plan, location: str, dry_run: bool) -> list[str]:
    """What `gc` prints: one line per path it removes (its size, its path), then what that frees."""
    held = planned.held or 0
    if not planned.remove:
        return [
            f"nothing to remove: the given configs reference every recorded unit output in {location} "
            f"({human(held)}, {held} bytes)"
        ]
    sizes = {path: human(size) for path, size in planned.remove.items()}
    width = max(len(text) for text in sizes.values())
    lines = [f"{sizes[path]:>{width}}  {path}" for path in sorted(planned.remove)]
    verb = "would free" if dry_run else "freed"
    lines.append(
        f"{verb} {human(planned.freed)} of {human(held)} the run directory's units hold "
        f"({planned.freed} of {held} bytes, {len(planned.remove)} paths)"
    )
    return lines


def unreferenced_line(planned: Plan, command: str) -> str | None:
    """The run summary's line on what the run directory holds that this config does not use (None: nothing)."""
    if not planned.remove:
        return None
    return (
        f"unreferenced: {human(planned.freed)} ({planned.freed} bytes) in {len(planned.remove)} unit outputs this "
        f"config does not use; `{command}` lists them (without --dry-run it removes them)"
    )
