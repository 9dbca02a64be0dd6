"""Stage table mechanics on the real ingest stage: skip when done, re-run on a config change, atomic commit."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"


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
    assert run.stage_record("data")["status"] == "running"  # the older done record went first
    assert not run.stage_done("data", pipeline.stage_key("data", cfg))
    assert run.data.files() == ["new.txt"]  # the old output was removed before the stage began

    def finishing(cfg, run, key):
        (run.data / "whole.txt").write_text(key)
        return {"rows": 1}

    monkeypatch.setitem(pipeline.STAGES, "data", replace(pipeline.STAGES["data"], run=finishing))
    record = pipeline.run_stage("data", cfg, run, log=lambda _: None)
    assert run.data.files() == ["whole.txt"] and record["rows"] == 1
    assert run.stage_done("data", pipeline.stage_key("data", cfg))


def test_a_stage_refuses_to_run_before_its_inputs_exist(tmp_path):
    cfg = demo_cfg(tmp_path)
    with pytest.raises(pipeline.StageOrderError, match="run `gradfilter-ray data`"):
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
