"""Command line: `gradfilter-ray run|compare|gc|<stage>` (stages: data, tokens, ensemble, gradients, scoring,
selection, audit, report, finetune, evaluation; `run` runs the audit only when `audit.enabled`; `gc` removes the unit
outputs no given config references).

One code path for `make run`, `ray job submit` and a KubeRay RayJob: parse, load and validate the config, open a
Ray session when a stage has work to do, run the stage table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import subprocess
import sys
import traceback
from importlib import metadata
from pathlib import Path

import yaml

from gradfilter_ray import pipeline, preflight
from gradfilter_ray.config import Config, ConfigError, config_hash, load, to_dict
from gradfilter_ray.data.sources import SourceError
from gradfilter_ray.driver_claim import DriverClaim, OutputDirInUse
from gradfilter_ray.rundir import RunDir, one_line, root_cause
from gradfilter_ray.storage import StorageError

PACKAGES = ("gradfilter-ray", "ray", "torch", "transformers", "peft", "pyarrow", "deepspeed", "accelerate", "numpy")

# docs/errors.md: what each code means and the messages behind it. An expected error prints one line; an unexpected
# one (EXIT_UNEXPECTED, Python's own code for an uncaught exception) prints its traceback.
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_IN_USE = 3
EXIT_ORDER = 4
EXIT_INTERRUPTED = 130  # what a shell reports for a program ended by Ctrl-C


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


def _compare(cfg: Config, run: RunDir, config: str | None, overrides: list[str]) -> int:
    """Rebuild evaluation/compare.* and the plots from this config's view (runs.json, judge.json), which only a
    finished evaluation of this config wrote: another config's view is never shown as this one's."""
    from gradfilter_ray.evaluation.compare import rebuild_comparison

    if not run.stage_done("evaluation", pipeline.stage_key("evaluation", cfg)):
        command = command_line("evaluation", config, overrides)
        print(
            f"error: {run.location} holds no finished evaluation of this config: run `{command}` first (it reuses "
            "every evaluated run and judged pair already there)",
            file=sys.stderr,
        )
        return EXIT_ORDER
    rows, table = rebuild_comparison(run.evaluation, run.root)
    print(f"compared {len(rows)} runs: {run.evaluation / 'compare.md'}")
    print(table)
    return 0


def command_line(verb: str, config: str | None, overrides: list[str], *extra: str) -> str:
    """The shell command that runs `verb` on the same config and overrides as this one (for messages to the user)."""
    args = ["gradfilter-ray", verb, *(["--config", config] if config else [])]
    return shlex.join([*args, *(arg for item in overrides for arg in ("--set", item)), *extra])


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
        _add_overrides(p)
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, run nothing")
        p.add_argument("--force", action="store_true", help="re-run stages even when already done")
        p.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="show Ray's and the libraries' own logs too (sets ray.log_level=INFO; docs/console.md)",
        )
    collect = sub.add_parser("gc", help="remove the unit outputs in output_dir that none of the given configs uses")
    collect.add_argument(
        "--config",
        "-c",
        dest="configs",
        metavar="CONFIG",
        action="append",
        default=[],
        help="a config whose outputs to keep (repeat it to keep several configs' outputs)",
    )
    _add_overrides(collect)
    collect.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    reference = sub.add_parser("config-reference", help="print the configuration reference (Markdown) of every field")
    reference.add_argument("--output", "-o", help="write it to this file instead of stdout (docs/configuration.md)")
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set ensemble.members=3 (value parsed as YAML)",
    )


def _config_reference(output: str | None) -> int:
    from gradfilter_ray.config_reference import render

    text = render()
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `gradfilter-ray` program (argv None: its own process, whose stderr it may filter) or a caller's argv."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.own_process = own_process
    args.given_overrides = list(getattr(args, "overrides", []))  # the user's own, for the commands the run suggests
    # Each line out as it is printed, in order with Ray's lines on stderr, also into a pipe or a file.
    if hasattr(sys.stdout, "reconfigure"):  # a test's capture may stand in for it
        sys.stdout.reconfigure(line_buffering=True)
    if getattr(args, "verbose", False):  # before the user's own --set: an explicit ray.log_level=DEBUG wins
        args.overrides = ["ray.log_level=INFO", *args.overrides]
    if args.command == "config-reference":
        return _config_reference(args.output)
    try:
        return _main(args, argv)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler, inside fit(), ends in sys.exit
        print("interrupted: the same command resumes the run where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure ends here: one line if expected, else its traceback
        return _failed(exc)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "gc":
        return _gc(args.configs, args.overrides, args.dry_run)
    cfg = load(args.config, args.overrides)
    stages = [n for n, s in pipeline.STAGES.items() if s.in_run(cfg)] if args.command == "run" else [args.command]
    if args.dry_run and args.command != "compare":
        _dry_run(cfg, stages)
        return 0

    run = RunDir(cfg.output_dir)
    if "data" in stages:
        # Before the run directory is created or claimed: a refused input leaves nothing behind.
        data_key = pipeline.stage_key("data", cfg)
        for note in preflight.check_inputs(cfg, run, data_key, force=args.force):
            print(f"note: {note}", file=sys.stderr)
    run.ensure_exists()
    with DriverClaim(run.root) as claim:
        run.guard = claim.check
        if args.command != "compare":
            pipeline.check_ready(cfg, stages, run, force=args.force)  # before Ray starts, too
        return _drive(cfg, run, args, stages, argv)


def _gc(paths: list[str], overrides: list[str], dry_run: bool) -> int:
    """Remove (or, dry, list) the recorded unit outputs in the configs' run directory that none of them references."""
    from gradfilter_ray import gc

    configs = [load(path, overrides) for path in paths or [None]]
    places = sorted({str(RunDir(cfg.output_dir).root) for cfg in configs})
    if len(places) > 1:
        raise ConfigError(f"the configs name different output_dirs ({', '.join(places)}): gc works on one at a time")
    run = RunDir(configs[0].output_dir)
    if not run.root.exists():
        raise StorageError(f"output_dir {run.location} does not exist: there is nothing to remove")
    if dry_run:  # reads only: no claim, like every verb's --dry-run
        print("\n".join(gc.plan_lines(gc.plan(run, configs, measure_held=True), run.location, dry_run=True)))
        return 0
    with DriverClaim(run.root) as claim:
        run.guard = claim.check
        planned = gc.plan(run, configs, measure_held=True)
        gc.collect(run, planned)
    print("\n".join(gc.plan_lines(planned, run.location, dry_run=False)))
    return 0


def _failed(exc: Exception) -> int:
    """The exit code for `exc`, after one line for an expected error (from a Ray task too) or the traceback."""
    from gradfilter_ray.shared_dir import OutputDirNotShared

    cause = root_cause(exc)
    expected = [
        (ConfigError, "config error", EXIT_CONFIG),
        ((SourceError, StorageError, OutputDirNotShared), "error", EXIT_CONFIG),
        (OutputDirInUse, "error", EXIT_IN_USE),
        (pipeline.StageOrderError, "error", EXIT_ORDER),
    ]
    for kinds, label, code in expected:
        if isinstance(cause, kinds):
            print(f"{label}: {one_line(cause)}", file=sys.stderr)
            return code
    traceback.print_exception(exc)
    return EXIT_UNEXPECTED


def _drive(cfg: Config, run: RunDir, args: argparse.Namespace, stages: list[str], argv: list[str]) -> int:
    if args.command == "compare":
        return _compare(cfg, run, args.config, args.given_overrides)

    from gradfilter_ray.console import filter_native_stderr, is_quiet
    from gradfilter_ray.report import summarize_run, summary_lines
    from gradfilter_ray.runtime import ray_session
    from gradfilter_ray.shared_dir import check_output_dir_shared

    run.clean_scratch()
    _record_run(cfg, run, argv)
    if args.own_process and is_quiet(cfg.ray.log_level):
        filter_native_stderr()
    # With every stage done for this config there is nothing to run: no Ray is started (or joined) to say so.
    work_to_do = any(pipeline.has_work(name, cfg, run, args.force) for name in stages)
    with ray_session(cfg.ray) if work_to_do else contextlib.nullcontext():
        if work_to_do:
            check_output_dir_shared(run.root)
        for name in stages:
            pipeline.run_stage(name, cfg, run, force=args.force)
    keys = {name: pipeline.stage_key(name, cfg) for name in pipeline.STAGES}
    print("\n".join(summary_lines(summarize_run(run.read_manifest(), str(run.root), keys))))
    _print_unreferenced(cfg, run, args)
    return 0


def _print_unreferenced(cfg: Config, run: RunDir, args: argparse.Namespace) -> None:
    """One line on the unit outputs of other configs the run directory holds, and the command that lists them."""
    from gradfilter_ray import gc

    try:
        planned = gc.plan(run, [cfg])
    except OSError:  # a store hiccup here must not fail a finished run: the line is only a pointer
        return
    line = gc.unreferenced_line(planned, command_line("gc", args.config, args.given_overrides, "--dry-run"))
    if line:
        print(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
