"""Command line: `gradfilter-ray run|compare|<stage>` (stages: data, tokens, ensemble, gradients, scoring, selection,
audit, report, finetune, evaluation; `run` runs the audit only when `audit.enabled`).

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
from gradfilter_ray.driver_claim import DriverClaim, OutputDirInUse
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.storage import StorageError

PACKAGES = ("gradfilter-ray", "ray", "torch", "transformers", "peft", "pyarrow", "deepspeed", "accelerate", "numpy")

EXIT_CONFIG = 2
EXIT_IN_USE = 3
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


def _record_run(cfg: Config, run: RunDir, argv: list[str]) -> None:
    resolved = to_dict(cfg)
    run.update_manifest(
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
    print("\n".join(pipeline.plan(cfg, stages)))


def _compare(run: RunDir) -> int:
    """Rebuild evaluation/compare.* and the plots from what the run directory holds (whatever config produced it)."""
    import tempfile

    from gradfilter_ray.evaluation.compare import write_comparison

    if not (run.evaluation / "runs.json").exists():
        print(f"error: {run.location} has no evaluated runs: run `gradfilter-ray evaluation` first", file=sys.stderr)
        return EXIT_ORDER
    with tempfile.TemporaryDirectory(prefix="gfr-compare-") as tmp:
        eval_dir = run.evaluation.get(Path(tmp) / "evaluation")
        rows = write_comparison(eval_dir, run.finetune)
        for name in ("compare.csv", "compare.md", "train_loss.png", "heldout_loss.png"):
            if (eval_dir / name).exists():
                (run.evaluation / name).write_bytes((eval_dir / name).read_bytes())
        table = (eval_dir / "compare.md").read_text()
    print(f"compared {len(rows)} runs: {run.evaluation / 'compare.md'}")
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradfilter-ray", description="GradFiltering on Ray: pick the data worth training on."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ["run", *pipeline.STAGES, "compare"]:
        help_text = {
            "run": "run every stage in order",
            "compare": "rebuild evaluation/compare.csv, compare.md and the plots from the run directory's outputs",
            "audit": "planted-noise audit: how many corrupted rows each scorer selects (audit/recovery.md)",
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
    stages = [n for n, s in pipeline.STAGES.items() if s.in_run(cfg)] if args.command == "run" else [args.command]
    if args.dry_run and args.command != "compare":
        _dry_run(cfg, stages)
        return 0

    run = RunDir(cfg.output_dir)
    try:
        run.ensure_exists()
        with DriverClaim(run.root) as claim:
            run.guard = claim.check
            return _drive(cfg, run, args, stages, argv)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OutputDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IN_USE


def _drive(cfg: Config, run: RunDir, args: argparse.Namespace, stages: list[str], argv: list[str]) -> int:
    if args.command == "compare":
        return _compare(run)

    from gradfilter_ray.report import summarize_run, summary_lines
    from gradfilter_ray.runtime import ray_session
    from gradfilter_ray.shared_dir import OutputDirNotShared, check_output_dir_shared

    run.clean_scratch()
    _record_run(cfg, run, argv)
    with ray_session(cfg.ray):
        try:
            check_output_dir_shared(run.root)
            for name in stages:
                pipeline.run_stage(name, cfg, run, force=args.force)
        except pipeline.StageOrderError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ORDER
        except OutputDirNotShared as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    keys = {name: pipeline.stage_key(name, cfg) for name in pipeline.STAGES}
    print("\n".join(summary_lines(summarize_run(run.read_manifest(), str(run.root), keys))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
