"""Command line: `gradfilter-ray run|ingest|ensemble|extract|score|select|finetune|evaluate|report`.

One code path for `make run`, `ray job submit` and a KubeRay RayJob: parse, load and validate the config, open a
Ray session, run the stage table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from gradfilter_ray import pipeline
from gradfilter_ray.config import Config, ConfigError, config_hash, load, to_dict
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.storage import StorageError

PACKAGES = ("gradfilter-ray", "ray", "torch", "transformers", "peft", "pyarrow", "deepspeed", "accelerate", "numpy")

EXIT_CONFIG = 2
EXIT_ORDER = 4


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _record_run(cfg: Config, rundir: RunDir, argv: list[str]) -> None:
    resolved = to_dict(cfg)
    rundir.update_manifest(
        config=resolved,
        config_hash=config_hash(cfg),
        seed=cfg.seed,
        versions=_versions(),
        git_sha=_git_sha(),
        command=argv,
    )


def _dry_run(cfg: Config, stages: list[str]) -> None:
    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(f"# config hash {config_hash(cfg)}")
    print("# stages")
    for name in stages:
        stage = pipeline.STAGES[name]
        print(f"- {name}: {stage.resources(cfg)} key={pipeline.stage_key(name, cfg)}")


def _compare(rundir: RunDir) -> int:
    """Rebuild eval/compare.* and the plots from what the run directory holds (whatever config produced it)."""
    from gradfilter_ray.evaluation.compare import write_comparison

    try:  # no-ops for a local run directory
        pipeline.fetch_driver_inputs("evaluate", rundir)
        rundir.ensure_local("evaluate")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ORDER
    if not (rundir.eval / "runs.json").exists():
        print(f"error: {rundir.location} has no evaluated runs: run `gradfilter-ray evaluate` first", file=sys.stderr)
        return EXIT_ORDER
    rows = write_comparison(rundir.eval, rundir.finetune)
    if rundir.store is not None:
        # Published like a stage, so other drivers' copies of eval/ are known to be stale.
        record = rundir.stage_record("evaluate") or {}
        rundir.finish_stage("evaluate", record["outputs"], record)
    print(f"compared {len(rows)} runs: {rundir.eval / 'compare.md'}")
    print((rundir.eval / "compare.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradfilter-ray", description="GradFiltering on Ray: pick the data worth training on."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ["run", *pipeline.STAGES, "compare"]:
        help_text = {
            "run": "run every stage in order",
            "compare": "rebuild eval/compare.csv, compare.md and the plots from the run directory's outputs",
        }.get(name, f"run the {name} stage alone")
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", help="YAML config file (see jobs/configs/)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set ensemble.members=3 (value parsed as YAML)",
        )
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
        p.add_argument("--force", action="store_true", help="re-run stages even when already done")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stages = list(pipeline.STAGES) if args.command == "run" else [args.command]
    if args.dry_run and args.command != "compare":
        _dry_run(cfg, stages)
        return 0

    rundir = RunDir(cfg.output_dir, cfg.work_dir or None)
    try:
        rundir.pull()
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "compare":
        return _compare(rundir)

    from gradfilter_ray.runtime import ray_session

    rundir.clean_stale_staging()
    _record_run(cfg, rundir, argv)
    with ray_session(cfg.ray):
        try:
            for name in stages:
                pipeline.run_stage(name, cfg, rundir, force=args.force)
        except pipeline.StageOrderError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ORDER
    where = rundir.location if rundir.store is None else f"{rundir.location} (driver's copy: {rundir.root})"
    print(f"outputs in {where}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
