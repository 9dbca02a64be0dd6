"""Stage table mechanics: skip when done, a config change re-runs exactly the stages it affects (keys on the whole
table; on the real ingest stage; on score -> select -> report over a synthetic run), atomic commit, order, the
dry-run plan and config errors of the CLI."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import synthetic_run

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.finetune import stage as finetune_stage
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.units import ensemble_members

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
# The stages `run` needs no target for, less the opt-in audit (off in the tiny config).
CORE = [s for s in list(pipeline.STAGES)[: list(pipeline.STAGES).index("report") + 1] if s != "audit"]


def demo_cfg(tmp_path, *extra):
    return load(DEMO, [f"output_dir={tmp_path / 'run'}", "data.limit=30", *extra])


@pytest.mark.ray
def test_finished_stage_is_skipped_and_config_change_reruns_it(ray_cluster, tmp_path):
    cfg = demo_cfg(tmp_path)
    rundir = RunDir(cfg.output_dir)
    first = pipeline.run_stage("data", cfg, rundir, log=lambda _: None)
    assert first["rows_in"] == 30 and rundir.stage_done("data", pipeline.stage_key("data", cfg))
    messages = []
    again = pipeline.run_stage("data", cfg, rundir, log=messages.append)
    assert again["finished"] == first["finished"] and "already done" in messages[0]

    changed = demo_cfg(tmp_path, "data.limit=20")
    assert pipeline.stage_key("data", changed) != pipeline.stage_key("data", cfg)
    assert pipeline.stage_key("ensemble", changed) != pipeline.stage_key("ensemble", cfg)
    rerun = pipeline.run_stage("data", changed, rundir, log=lambda _: None)
    assert rerun["rows_in"] == 20
    # a change to a later section leaves ingest's key alone
    later = demo_cfg(tmp_path, "data.limit=20", "ensemble.members=2")
    assert pipeline.stage_key("data", later) == pipeline.stage_key("data", changed)
    assert pipeline.stage_key("ensemble", later) != pipeline.stage_key("ensemble", changed)
    assert not (Path(cfg.output_dir) / ".scratch").exists() or not list((Path(cfg.output_dir) / ".scratch").iterdir())


def test_a_crashing_stage_is_not_done_and_its_rerun_replaces_every_old_output(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    (run.data / "old.txt").write_text("old")
    run.record_stage("data", {"status": "done", "key": "an older key"})

    def crashing(cfg, run, key):
        (run.data / "new.txt").write_text("partial")
        raise RuntimeError("killed mid-stage")

    monkeypatch.setitem(pipeline.STAGES, "data", replace(pipeline.STAGES["data"], run=crashing))
    cfg = demo_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run_stage("data", cfg, run, log=lambda _: None)
    failed = run.stage_record("data")  # the older done record went first
    assert (failed["status"], failed["reason"]) == ("failed", "RuntimeError: killed mid-stage")
    assert not run.stage_done("data", pipeline.stage_key("data", cfg))
    assert run.data.files() == ["new.txt"]  # the old output was removed before the stage began

    def finishing(cfg, run, key):
        (run.data / "whole.txt").write_text(key)
        return {"rows": 1}

    monkeypatch.setitem(pipeline.STAGES, "data", replace(pipeline.STAGES["data"], run=finishing))
    record = pipeline.run_stage("data", cfg, run, log=lambda _: None)
    assert run.data.files() == ["whole.txt"] and record["rows"] == 1
    assert run.stage_done("data", pipeline.stage_key("data", cfg))


def test_a_forced_side_by_side_stage_redoes_its_units_itself_once_its_record_says_running(tmp_path, monkeypatch):
    cfg = demo_cfg(tmp_path)
    run = RunDir(cfg.output_dir)
    run.record_stage("tokens", {"status": "done", "key": pipeline.stage_key("tokens", cfg)})
    key = pipeline.stage_key("ensemble", cfg)
    ours, theirs = "ensemble/member_seed42-1111111111111111", "ensemble/member_seed7-2222222222222222"
    for rel in (ours, theirs):
        (run.at(rel) / "_done").write_text("{}")
    run.add_references("ensemble", key, [ours])
    run.record_stage("ensemble", {"status": "done", "key": key, "outputs": ["ensemble"]})
    seen = []

    def ensemble(cfg, run, key, **kwargs):
        status = run.stage_record("ensemble")["status"]
        seen.append((kwargs, status, run.at(ours).exists(), run.at(theirs).exists()))
        return {"members": 1}

    monkeypatch.setitem(pipeline.STAGES, "ensemble", replace(pipeline.STAGES["ensemble"], run=ensemble))
    quiet = {"log": lambda _: None}
    pipeline.run_stage("ensemble", cfg, run, **quiet)
    assert seen == []  # done: skipped
    pipeline.run_stage("ensemble", cfg, run, force=True, **quiet)
    # The runner removed nothing (the stage redoes this config's units), and the stage began after the record left
    # "done": a kill inside the stage leaves it not done.
    assert seen == [({"force": True}, "running", True, True)]
    assert run.stage_done("ensemble", key)
    first_time = demo_cfg(tmp_path, "ensemble.members=2")  # a key never run: forced, its stage is told so too
    pipeline.run_stage("ensemble", first_time, run, force=True, **quiet)
    pipeline.run_stage("ensemble", cfg, run, **quiet)  # not forced: called as (cfg, run, key)
    assert [kwargs for kwargs, *_ in seen] == [{"force": True}, {"force": True}, {}]
    assert all(s.side_by_side for name, s in pipeline.STAGES.items() if name in ("ensemble", "gradients", "audit"))


def test_a_stage_refuses_to_run_before_its_inputs_exist(tmp_path):
    cfg = demo_cfg(tmp_path)
    first_input = pipeline.STAGES["ensemble"].reads[0]
    with pytest.raises(pipeline.StageOrderError, match=f"run `gradfilter-ray {first_input}`"):
        pipeline.run_stage("ensemble", cfg, RunDir(cfg.output_dir))


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "gradfilter_ray", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_dry_run_prints_config_plan_and_resources():
    out = run_cli("run", "--config", str(DEMO), "--dry-run", "--set", "ensemble.members=3")
    assert out.returncode == 0, out.stderr
    assert "members: 3" in out.stdout and "3 Ray Train workers" in out.stdout
    table = out.stdout.split("# stages\n", 1)[1].splitlines()
    assert len(table) <= 30  # one screen
    for name, stage in pipeline.STAGES.items():
        block = "\n".join(table[table.index(next(line for line in table if line.startswith(name + " "))) :][:3])
        assert f"key {pipeline.stage_key(name, load(DEMO, ['ensemble.members=3']))}" in block
        assert f"writes [{', '.join(stage.writes)}]" in block and f"reads [{', '.join(stage.reads)}]" in block


def test_cli_config_errors_exit_2_naming_the_field():
    out = run_cli("run", "--config", str(DEMO), "--set", "ensemble.memberz=3")
    assert out.returncode == 2 and "ensemble.memberz" in out.stderr


def tiny_cfg(tmp_path, *extra):
    base = ("ensemble.members=2", "ray.progress_bars=false", "finetune.scorers=[]")
    return load(TINY, [f"output_dir={tmp_path / 'run'}", *base, *extra])


def downstream(stages: set[str]) -> set[str]:
    """The stages plus everything that reads them, directly or not."""
    found = set(stages)
    while True:
        more = {name for name, st in pipeline.STAGES.items() if set(st.reads) & found} - found
        if not more:
            return found
        found |= more


def test_stage_keys_change_exactly_for_the_stages_a_config_field_affects(tmp_path):
    base = tiny_cfg(tmp_path)

    def invalidated(override: str) -> set[str]:
        cfg = tiny_cfg(tmp_path, override)
        return {s for s in pipeline.STAGES if pipeline.stage_key(s, cfg) != pipeline.stage_key(s, base)}

    directly = {
        "scoring.eps=0.001": {"scoring", "audit"},  # the audit scores its own sample alike
        "scoring.random_seed=7": {"scoring", "audit"},
        "selection.ratios=[0.2]": {"selection", "audit"},
        "gradients.precision=float64": {"gradients", "audit"},
        "proxy.max_length=96": {"tokens", "ensemble", "gradients", "audit"},
        "ensemble.lora_rank=2": {"ensemble", "audit"},
        "ensemble.seed=1": {"ensemble", "audit"},
        "audit.seed=3": {"audit", "report"},  # the report shows the audit's results
        # only selection and the report read the scorer list: scoring writes every scorer's columns
        "scoring.scorers=[gsnr, random]": {"selection", "audit"},
        "evaluation.judge.model=judge-2": {"evaluation"},
        "data.limit=10": {"data"},
        "data.max_field_chars=100": {"data"},
        # knobs that change how fast, not what: nothing is re-run
        "gradients.batch_size=4": set(),
        "gradients.num_actors=2": set(),
        "gradients.shard_rows=64": set(),
        "gradients.torch_threads=2": set(),
        "ray.num_cpus=1": set(),
        # timeouts, retries, concurrency and checkpointing never re-key
        "evaluation.judge.timeout_s=5": set(),
        "evaluation.judge.concurrency=1": set(),
        "evaluation.judge.max_retries=0": set(),
        "finetune.checkpoint=none": set(),
        # resolved values key, not settings: on CPU, auto is float32, and the head's float32 is a no-op in float32
        "gradients.precision=auto": set(),
        "gradients.head_precision=model": set(),
        "ensemble.precision=float32": set(),
        "ray.progress_bars=true": set(),
        f"output_dir={tmp_path / 'moved'}": set(),  # a run directory can move
    }
    for override, stages in directly.items():
        assert invalidated(override) == downstream(stages), override
    assert invalidated("scoring.eps=0.001") & set(CORE) == {"scoring", "selection", "report"}


def test_raising_max_failures_does_not_invalidate_the_ensemble(tmp_path):
    base = tiny_cfg(tmp_path)
    more = tiny_cfg(tmp_path, "ensemble.max_failures=5")
    key = pipeline.stage_key("ensemble", base)
    assert pipeline.stage_key("ensemble", more) == key
    # Ray Train's run is named from the members it trains, whose keys leave it out: the resumed trainer finds the old
    # run's checkpoints
    tokens_key = pipeline.stage_key("tokens", base)
    assert ensemble_stage.trainer_name(ensemble_members(more, tokens_key)) == (
        ensemble_stage.trainer_name(ensemble_members(base, tokens_key))
    )
    target_more = tiny_cfg(tmp_path, "finetune.max_failures=5")
    target_key = pipeline.stage_key("finetune", base)
    assert pipeline.stage_key("finetune", target_more) == target_key
    assert finetune_stage.trainer_name(target_more, target_key, "gsnr_0.1") == (
        finetune_stage.trainer_name(base, target_key, "gsnr_0.1")
    )


def test_how_wide_or_where_a_stage_runs_does_not_invalidate_its_outputs(tmp_path):
    base = tiny_cfg(tmp_path)
    for stage, override in [
        ("finetune", "finetune.parallel_subsets=3"),
        ("finetune", "finetune.placement_strategy=PACK"),
        ("evaluation", "evaluation.num_actors=4"),
    ]:
        assert pipeline.stage_key(stage, tiny_cfg(tmp_path, override)) == pipeline.stage_key(stage, base), override
    # what changes the trained weights still does
    assert pipeline.stage_key("finetune", tiny_cfg(tmp_path, "finetune.learning_rate=0.01")) != pipeline.stage_key(
        "finetune", base
    )


@pytest.mark.ray
def test_changing_scoring_eps_reruns_score_select_report_only(ray_cluster, tmp_path):
    root = tmp_path / "run"
    cfg = tiny_cfg(tmp_path, "selection.ratios=[0.1, 0.3]")
    rundir = synthetic_run(root, cfg, np.arange(60) * 3 + 5, np.random.default_rng(1), parts=2)
    model = [s for s in CORE if s not in ("scoring", "selection", "report")]
    for stage in CORE:
        pipeline.run_stage(stage, cfg, rundir, log=lambda _: None)
    before = rundir.read_manifest()["stages"]
    gsnr_before = pq.read_table(root / "scoring" / "scores.parquet", columns=["gsnr"])["gsnr"].to_numpy()

    changed = tiny_cfg(tmp_path, "selection.ratios=[0.1, 0.3]", "scoring.eps=100.0")
    messages: list[str] = []
    for stage in CORE:
        pipeline.run_stage(stage, changed, rundir, log=messages.append)
    skipped = {m.split("]")[0][1:] for m in messages if "already done" in m}
    ran = {m.split("]")[0][1:] for m in messages if "] running" in m}
    assert skipped == set(model) and ran == {"scoring", "selection", "report"}
    after = rundir.read_manifest()["stages"]
    for stage in model:
        assert after[stage] == before[stage]
    for stage in ("scoring", "selection", "report"):
        assert after[stage]["key"] != before[stage]["key"]
        assert rundir.stage_done(stage, pipeline.stage_key(stage, changed))
    gsnr_after = pq.read_table(root / "scoring" / "scores.parquet", columns=["gsnr"])["gsnr"].to_numpy()
    assert not np.allclose(gsnr_before, gsnr_after)  # the new eps was really applied

    again: list[str] = []
    for stage in CORE:
        pipeline.run_stage(stage, changed, rundir, log=again.append)
    assert all("already done" in m for m in again) and len(again) == len(CORE)
