"""The pipeline: a table of stage shells, each keyed by the config it depends on, skipped when already done.

A stage's key hashes the config sections it reads plus the keys of the stages it reads from, so a config change
re-runs exactly the stages it affects and everything downstream of them, and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradfilter_ray.config import Config, section_hash
from gradfilter_ray.rundir import RunDir, StageTimer

StageFn = Callable[[Config, RunDir, Path], tuple[list[str], dict[str, Any]]]


class StageOrderError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    depends_on: Callable[[Config], tuple]
    resources: Callable[[Config], str]
    entry: str  # "module:function" of the Ray shell
    # Stages whose outputs the driver itself reads (Ray workers read through RunDir.shared instead); with an
    # object-store output_dir these are downloaded to the driver's working copy before the stage runs.
    driver_reads: tuple[str, ...] = ()
    # Folders of this stage's outputs no driver ever reads (fine-tuned weights: evaluation actors fetch them).
    driver_skips: tuple[str, ...] = ()

    def load(self) -> StageFn:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


def _without_retry_budget(section):
    """How often Ray Train may restart a worker group changes no result: raising it to resume a crashed run must
    not re-key the stage (which would rename its Ray Train run and start over)."""
    return dataclasses.replace(section, max_failures=0)


def _ensemble_resources(cfg: Config) -> str:
    e = cfg.ensemble
    return f"{e.members} Ray Train workers x ({e.cpus_per_member} CPU, {e.gpus_per_member} GPU)"


def _extract_resources(cfg: Config) -> str:
    g = cfg.gradients
    return f"{g.num_actors} Ray Data actors x ({g.cpus_per_actor} CPU, {g.gpus_per_actor} GPU)"


def _finetune_resources(cfg: Config) -> str:
    t = cfg.target
    return (
        f"per subset, {t.num_workers} Ray Train workers x ({t.cpus_per_worker} CPU, {t.gpus_per_worker} GPU), "
        f"DeepSpeed ZeRO-{t.zero_stage}"
    )


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "ingest", (), lambda c: (c.data,), lambda c: "Ray Data tasks, 1 CPU each", "gradfilter_ray.data.stage:run"
        ),
        Stage(
            "ensemble",
            ("ingest",),
            lambda c: (c.proxy, _without_retry_budget(c.ensemble)),
            _ensemble_resources,
            "gradfilter_ray.ensemble.stage:run",
        ),
        Stage(
            "extract",
            ("ingest", "ensemble"),
            lambda c: (c.proxy, c.gradients.precision),
            _extract_resources,
            "gradfilter_ray.gradients.stage:run",
            driver_reads=("ingest", "ensemble"),
        ),
        Stage(
            "score",
            ("extract",),
            lambda c: (c.scoring,),
            lambda c: "driver, streaming (IFD losses come from the extraction pass)",
            "gradfilter_ray.scoring.stage:run_score",
            driver_reads=("extract",),
        ),
        Stage(
            "select",
            ("score",),
            lambda c: (c.selection,),
            lambda c: "driver, streaming two-pass top-k",
            "gradfilter_ray.scoring.stage:run_select",
            driver_reads=("ingest", "score"),
        ),
        Stage(
            "report",
            ("score", "select"),
            lambda c: (),
            lambda c: "driver",
            "gradfilter_ray.report:run",
            driver_reads=("ingest", "score", "select"),
        ),
        Stage(
            "finetune",
            ("select",),
            lambda c: (_without_retry_budget(c.target),),
            _finetune_resources,
            "gradfilter_ray.target.stage:run",
            driver_reads=("select",),
            driver_skips=("model",),
        ),
        Stage(
            "evaluate",
            ("finetune",),
            lambda c: (c.evaluation, c.target.max_length),
            lambda c: (
                f"Ray Data batch inference, 1 actor x ({c.evaluation.cpus_per_actor} CPU, "
                f"{c.evaluation.gpus_per_actor} GPU) per run; judge when configured"
            ),
            "gradfilter_ray.evaluation.stage:run",
            driver_reads=("finetune",),
        ),
    ]
}


def stage_key(name: str, cfg: Config) -> str:
    stage = STAGES[name]
    upstream = [stage_key(u, cfg) for u in stage.upstream]
    return section_hash(name, *stage.depends_on(cfg), upstream)


def run_stage(name: str, cfg: Config, rundir: RunDir, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run one stage unless it is already done with the same key; returns its manifest record."""
    stage = STAGES[name]
    key = stage_key(name, cfg)
    for up in dict.fromkeys((*stage.upstream, *stage.driver_reads)):
        if not rundir.stage_done(up, stage_key(up, cfg)):
            raise StageOrderError(
                f"stage '{name}' needs the output of '{up}' for this config in {rundir.root}: run "
                f"`gradfilter-ray {up}` (or `gradfilter-ray run`) first"
            )
    if not force and rundir.stage_done(name, key):
        log(f"[{name}] already done (key {key}), skipping")
        return rundir.stage_record(name) or {}
    fn = stage.load()
    log(f"[{name}] running ({stage.resources(cfg)})")
    fetch_driver_inputs(name, rundir)
    timer = StageTimer()
    with rundir.staging(name) as staged:
        outputs, counts = fn(cfg, rundir, staged)
        rundir.commit(staged, outputs)
    record = timer.record(key, outputs=outputs, **counts)
    rundir.finish_stage(name, outputs, record)
    log(f"[{name}] done in {record['seconds']:.1f}s: " + ", ".join(f"{k}={v}" for k, v in counts.items() if _short(v)))
    return record


def fetch_driver_inputs(name: str, rundir: RunDir) -> None:
    """With an object-store output_dir: download what the driver reads for stage `name` (no-op when local).
    run_stage has checked that each of those stages is done with this config's key."""
    for up in STAGES[name].driver_reads:
        rundir.ensure_local(up, skip_dirs=STAGES[up].driver_skips)


def _short(value: Any) -> bool:
    return isinstance(value, int | float | str) or (isinstance(value, dict) and len(value) <= 12)
