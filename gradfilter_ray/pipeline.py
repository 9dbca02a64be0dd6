"""The job: a table of stages, each row the stage function itself, what it reads, what keys it, what it writes.

A stage's key hashes the config fields it is keyed by plus the keys of the stages it reads, so a config change
re-runs exactly the stages it affects and everything downstream of them, and nothing else. The runner passes the
key into the stage (shells never import this module) and owns the commit protocol of `rundir.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradfilter_ray.audit.plant import PLANT_VERSION
from gradfilter_ray.audit.stage import sample_and_plant, write_recovery
from gradfilter_ray.config import Config, keyed_value, section_hash
from gradfilter_ray.console import CONSOLE, prefixed, say
from gradfilter_ray.data.stage import run as data
from gradfilter_ray.data.tokens_stage import run as tokens
from gradfilter_ray.ensemble.stage import run as ensemble
from gradfilter_ray.evaluation.stage import run as evaluation
from gradfilter_ray.finetune.stage import run as finetune
from gradfilter_ray.gradients.stage import run as gradients
from gradfilter_ray.report import run as report
from gradfilter_ray.resources import (
    Request,
    audit_tasks,
    data_tasks,
    evaluation_actors,
    extraction_actors,
    member_trainers,
    one_task,
    subset_trainers,
)
from gradfilter_ray.rundir import RunDir, StageTimer
from gradfilter_ray.runtime import run_as_task
from gradfilter_ray.scoring.stage import run_score as scoring
from gradfilter_ray.scoring.stage import run_select as selection

# Called as (cfg, run, key); a side-by-side stage also takes `force=True`: it then redoes every unit of this config.
StageFn = Callable[..., dict[str, Any]]


class StageOrderError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    reads: tuple[str, ...]  # stages whose outputs it reads
    keyed_by: tuple[str, ...]  # config fields (dotted) whose values key its outputs
    writes: tuple[str, ...]  # its outputs, relative to output_dir
    resources: Callable[[Config], Request]  # what it asks Ray for: the table shows it, its shell asks for it
    # Its outputs are units of every config run here, side by side, each named by its own key and recorded in the
    # manifest's references: the runner never removes them (`gc` reclaims them); under --force the stage itself
    # redoes this config's units, and only those.
    side_by_side: bool = False
    units: Callable[[Config], list[str]] = lambda c: []  # keys of the units it runs, added to its own key
    in_run: Callable[[Config], bool] = lambda c: True  # whether `run` runs it (its verb runs it either way)


# The stages the audit runs again on its own sample, in its own run directory (`audit/`).
AUDIT_STAGES = ("tokens", "ensemble", "gradients", "scoring")


def audit_data_key(cfg: Config) -> str:
    """The key of the audit's planted sample: the main data's key, the audit section (whether `run` runs it aside),
    the proxy (which planted rows it can see, `planted_visible`) and the planting code's version."""
    sample = {k: v for k, v in keyed_value(cfg, "audit").items() if k != "enabled"}
    return section_hash("audit-data", stage_key("data", cfg), sample, keyed_value(cfg, "proxy"), PLANT_VERSION)


def audit_stage_keys(cfg: Config) -> dict[str, str]:
    """The keys of the stages the audit runs in its own run directory: its planted sample's key stands for `data`."""
    fixed = {"data": audit_data_key(cfg)}
    return {name: stage_key(name, cfg, fixed) for name in ("data", *AUDIT_STAGES)}


def _audit_units(cfg: Config) -> list[str]:
    """What the audit stage's key adds to its own fields: the keys of the stages it runs on its sample, so it is
    redone whenever one of them would be (their fields and output versions included)."""
    return list(audit_stage_keys(cfg).values())


def audit(cfg: Config, run: RunDir, key: str, force: bool = False) -> dict:
    """Planted-noise audit: a seeded sample of `data/` with planted rows in `audit/data/`, then the same tokens,
    ensemble, gradients and scoring code on it in `audit/` (its own manifest and keys: the main run never sees a
    planted row), then how many planted rows each scorer's selections keep (`audit/recovery.*`). `force`: the sample
    is planted again and every inner stage redone, each side-by-side one for this config's units only."""
    inner = run.subdir("audit")
    data_key = audit_data_key(cfg)
    if force or not inner.stage_done("data", data_key):
        timer = StageTimer()
        try:
            inner.begin_stage("data", data_key, ("data",))
            counts = run_as_task(sample_and_plant, run.data, inner.data, cfg.audit, cfg.proxy)
        except BaseException as exc:
            inner.fail_stage("data", data_key, exc)
            raise
        inner.finish_stage("data", timer.record(data_key, outputs=["data"], **counts))
        say(f"[audit] planted {counts['planted']} of {counts['rows']} sampled rows {counts['planted_by_kind']}")
    records = {"data": inner.stage_record("data")}
    with prefixed("[audit] "):
        for name in AUDIT_STAGES:
            records[name] = run_stage(name, cfg, inner, force=force, fixed={"data": data_key})
    scorers, ratios = list(cfg.scoring.scorers), list(cfg.selection.ratios)
    summary = run_as_task(write_recovery, inner.scores, inner.data, run.audit, scorers, ratios, cfg.audit)
    return {**summary, "seconds_by_stage": {name: r.get("seconds") for name, r in records.items()}}


def _report(cfg: Config, run: RunDir, key: str) -> dict:
    """The report, shown this config's audit only (an audit of another config may have run last)."""
    return report(cfg, run, key, audit_key=stage_key("audit", cfg))


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("data", data, (), ("data",), ("data", "rejects.parquet"), data_tasks),
        Stage("tokens", tokens, ("data",), ("proxy",), ("tokens",), data_tasks),
        Stage(
            "ensemble", ensemble, ("tokens",), ("proxy", "ensemble"), ("ensemble",), member_trainers, side_by_side=True
        ),
        Stage(
            "gradients",
            gradients,
            ("tokens", "ensemble"),
            ("proxy", "gradients"),
            ("gradients",),
            extraction_actors,
            side_by_side=True,
        ),
        # Scoring writes every scorer's column whichever are configured: only selection and the report read the list.
        Stage(
            "scoring",
            scoring,
            ("gradients",),
            ("scoring.eps", "scoring.random_seed"),
            ("scoring",),
            one_task,
        ),
        Stage(
            "selection",
            selection,
            ("data", "scoring"),
            ("selection", "scoring.scorers"),
            ("selection",),
            one_task,
        ),
        Stage(
            "audit",
            audit,
            ("data",),
            ("audit", "scoring.scorers", "selection.ratios"),
            ("audit",),
            audit_tasks,
            # `audit/` is a run directory of its own (its manifest and its inner stages' units, every config's)
            side_by_side=True,
            units=_audit_units,
            in_run=lambda c: c.audit.enabled,
        ),
        # Keyed by the audit section: the report shows the audit's results when there are any.
        Stage("report", _report, ("data", "scoring", "selection"), ("audit",), ("report",), one_task),
        Stage(
            "finetune",
            finetune,
            ("data", "selection"),
            ("finetune",),
            ("finetune",),
            subset_trainers,
            side_by_side=True,
        ),
        Stage(
            "evaluation",
            evaluation,
            ("finetune",),
            ("evaluation", "finetune.max_length", "finetune.template", "finetune.chat_template"),
            ("evaluation",),
            evaluation_actors,
            side_by_side=True,  # its evaluated runs and judged pairs, each with its own key
        ),
    ]
}


# The figures a stage's closing console line shows, in this order (its manifest record keeps every count).
CLOSING_FIGURES = {
    "data": ("rows_in", "rows_kept", "rows_rejected", "files"),
    "tokens": ("rows", "tokens", "rows_no_response_tokens", "rows_with_tools"),
    "ensemble": ("members", "members_trained", "epochs", "rows_trained", "batching", "padding_efficiency"),
    "gradients": ("rows", "shards_computed", "shards_resumed", "examples_per_s", "oom_splits"),
    "scoring": ("rows_eligible", "ineligible_by_reason"),
    "selection": ("rows_with_response",),
    "audit": ("planted", "planted_invisible", "headline"),
    "report": ("figures",),
    "finetune": ("runs", "skipped", "last_loss"),
    "evaluation": ("runs", "prompts", "heldout_loss", "judge"),
}


def closing_line(name: str, seconds: float, counts: dict[str, Any]) -> str:
    """'[gradients] done in 61.8s: rows=400, shards_computed=4, ...': the stage's key figures, floats to 4 digits."""
    shown = [k for k in CLOSING_FIGURES.get(name, tuple(counts)) if k in counts and _short(counts[k])]
    figures = ", ".join(f"{k}={_figure(counts[k])}" for k in shown)
    return f"[{name}] done in {seconds:.1f}s" + (f": {figures}" if figures else "")


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_figure(v)}" for k, v in value.items()) + "}"
    return str(value)


# Bumped when a stage's output gains a column its readers need: older outputs are then rebuilt, never misread.
# data 2: the `conversation` column; 3: the `tools` column, and a system
# prompt or tools make a question-and-answer conversation its own example for dedup
# finetune 2: every subset in a folder named by its own key, which finetune/summary.json maps (evaluation reads it)
OUTPUT_VERSIONS = {"data": 3, "finetune": 2}


def stage_key(name: str, cfg: Config, fixed: dict[str, str] | None = None) -> str:
    """`fixed`: stages whose key is given rather than derived (the audit's `data`, which is its planted sample)."""
    if fixed and name in fixed:
        return fixed[name]
    stage = STAGES[name]
    values = [keyed_value(cfg, field) for field in stage.keyed_by]
    version = [OUTPUT_VERSIONS[name]] if name in OUTPUT_VERSIONS else []
    units = stage.units(cfg)
    return section_hash(name, *values, *version, [stage_key(up, cfg, fixed) for up in stage.reads], *units)


def run_stage(
    name: str,
    cfg: Config,
    run: RunDir,
    force: bool = False,
    log: Callable[[str], None] = say,
    fixed: dict[str, str] | None = None,
) -> dict:
    """Run one stage unless it is already done with the same key; returns its manifest record."""
    stage = STAGES[name]
    key = stage_key(name, cfg, fixed)
    for up in stage.reads:
        if not run.stage_done(up, stage_key(up, cfg, fixed)):
            raise order_error(name, up, run)
    if not has_work(name, cfg, run, force, fixed):
        log(f"[{name}] already done (key {key}), skipping")
        return run.stage_record(name) or {}
    log(f"[{name}] running ({stage.resources(cfg)})")
    timer = StageTimer()
    try:
        # Outputs side by side hold other configs' units: the runner removes none. Forced, the stage itself redoes
        # every unit of this config (each recorded before it is removed), once this record says "running".
        run.begin_stage(name, key, stage.writes, keep_outputs=stage.side_by_side)
        counts = stage.run(cfg, run, key, force=True) if force and stage.side_by_side else stage.run(cfg, run, key)
    except BaseException as exc:
        CONSOLE.keep_line()
        run.fail_stage(name, key, exc)
        raise
    record = timer.record(key, outputs=list(stage.writes), **counts)
    run.finish_stage(name, record)
    log(closing_line(name, record["seconds"], counts))
    return record


def has_work(name: str, cfg: Config, run: RunDir, force: bool = False, fixed: dict[str, str] | None = None) -> bool:
    """Whether `run_stage` runs this stage rather than skipping it: forced, or not done for this config's key."""
    return force or not run.stage_done(name, stage_key(name, cfg, fixed))


def order_error(name: str, up: str, run: RunDir) -> StageOrderError:
    return StageOrderError(
        f"stage '{name}' needs the output of '{up}' for this config in {run.location}: run "
        f"`gradfilter-ray {up}` (or `gradfilter-ray run`) first"
    )


def check_ready(cfg: Config, names: list[str], run: RunDir, force: bool = False) -> None:
    """Before Ray starts, what `run_stage` would stop these stages on, in order: an upstream output not done for
    this config that no earlier stage of `names` makes (`StageOrderError`), and an output path holding something
    this tool did not write (`rundir.ForeignOutput`)."""
    for position, name in enumerate(names):
        stage = STAGES[name]
        for up in stage.reads:
            if up not in names[:position] and not run.stage_done(up, stage_key(up, cfg)):
                raise order_error(name, up, run)
        if has_work(name, cfg, run, force):
            run.check_outputs_ours(name, stage.writes)


def plan(cfg: Config, names: list[str]) -> list[str]:
    """The table's view for --dry-run: one block per stage (key, reads, keyed by, writes, resources)."""
    lines = []
    for name in names:
        s = STAGES[name]
        lines.append(f"{name:<10} key {stage_key(name, cfg)}  {s.resources(cfg)}")
        lines.append(f"{'':<10} reads [{', '.join(s.reads)}]  keyed by [{', '.join(s.keyed_by)}]")
        lines.append(f"{'':<10} writes [{', '.join(s.writes)}]" + _keeps(s))
    return lines


def _keeps(stage: Stage) -> str:
    return "  (units of every config side by side, each keyed)" if stage.side_by_side else ""


def _short(value: Any) -> bool:
    """Whether a count belongs on the stage's closing line: a number or a word, or a small flat table that says
    something (an empty one, or one of tables such as per-member figures, is left to the manifest)."""
    if isinstance(value, dict):
        return 0 < len(value) <= 12 and not any(isinstance(v, dict) for v in value.values())
    return isinstance(value, int | float | str)
