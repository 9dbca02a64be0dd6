"""Stage table mechanics on the real ingest stage: skip when done, re-run on a config change, atomic commit."""

import json
import subprocess
import sys
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
    first = pipeline.run_stage("ingest", cfg, rundir, log=lambda _: None)
    assert first["rows_in"] == 30 and rundir.stage_done("ingest", pipeline.stage_key("ingest", cfg))
    messages = []
    again = pipeline.run_stage("ingest", cfg, rundir, log=messages.append)
    assert again["finished"] == first["finished"] and "already done" in messages[0]

    changed = demo_cfg(tmp_path, "data.limit=20")
    assert pipeline.stage_key("ingest", changed) != pipeline.stage_key("ingest", cfg)
    assert pipeline.stage_key("ensemble", changed) != pipeline.stage_key("ensemble", cfg)
    rerun = pipeline.run_stage("ingest", changed, rundir, log=lambda _: None)
    assert rerun["rows_in"] == 20
    # a change to a later section leaves ingest's key alone
    later = demo_cfg(tmp_path, "data.limit=20", "ensemble.members=2")
    assert pipeline.stage_key("ingest", later) == pipeline.stage_key("ingest", changed)
    assert pipeline.stage_key("ensemble", later) != pipeline.stage_key("ensemble", changed)
    assert not list(Path(cfg.output_dir).glob(".staging-*"))


def test_a_crashing_stage_leaves_old_outputs_and_no_done_record(tmp_path, monkeypatch):
    rundir = RunDir(tmp_path / "run")
    (rundir.root / "data").mkdir(parents=True)
    (rundir.root / "data" / "old.txt").write_text("old")

    def crashing(cfg, rundir, staged):
        (staged / "data").mkdir()
        (staged / "data" / "new.txt").write_text("partial")
        raise RuntimeError("killed mid-stage")

    monkeypatch.setattr("gradfilter_ray.data.stage.run", crashing)
    cfg = demo_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run_stage("ingest", cfg, rundir, log=lambda _: None)
    assert (rundir.root / "data" / "old.txt").read_text() == "old"
    assert rundir.stage_record("ingest") is None
    assert not list(rundir.root.glob(".staging-*"))


def test_a_stage_refuses_to_run_before_its_inputs_exist(tmp_path):
    cfg = demo_cfg(tmp_path)
    with pytest.raises(pipeline.StageOrderError, match="run `gradfilter-ray ingest`"):
        pipeline.run_stage("ensemble", cfg, RunDir(cfg.output_dir))


def test_commit_replaces_outputs_and_manifest_writes_are_atomic(tmp_path):
    rundir = RunDir(tmp_path)
    with rundir.staging("x") as staged:
        (staged / "out.txt").write_text("v1")
        rundir.commit(staged, ["out.txt"])
    with rundir.staging("x") as staged:
        (staged / "out.txt").write_text("v2")
        rundir.commit(staged, ["out.txt"])
    assert (tmp_path / "out.txt").read_text() == "v2"
    rundir.record_stage("x", {"status": "done", "key": "k"})
    assert rundir.stage_done("x", "k") and not rundir.stage_done("x", "other")
    assert json.loads(rundir.manifest_path.read_text())["stages"]["x"]["key"] == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "out.txt"]


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "gradfilter_ray", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_dry_run_prints_config_plan_and_resources():
    out = run_cli("run", "--config", str(DEMO), "--dry-run", "--set", "ensemble.members=3")
    assert out.returncode == 0, out.stderr
    assert "members: 3" in out.stdout and "- ingest:" in out.stdout and "- extract:" in out.stdout
    assert "3 Ray Train workers" in out.stdout


def test_cli_config_errors_exit_2_naming_the_field():
    out = run_cli("run", "--config", str(DEMO), "--set", "ensemble.memberz=3")
    assert out.returncode == 2 and "ensemble.memberz" in out.stderr
