"""The run directory on both backends (a local folder and s3:// on a local S3 server): one code path for the
commit protocol, whole-object writes, scratch, and the one-driver-per-output_dir claim."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gradfilter_ray import pipeline
from gradfilter_ray.config import ConfigError, load
from gradfilter_ray.data.sources import SourceError
from gradfilter_ray.driver_claim import CLAIM_FILE, DriverClaim, OutputDirInUse
from gradfilter_ray.rundir import MANIFEST, ForeignOutput, RunDir
from gradfilter_ray.storage import StorageError, check_uri, is_remote, local_path


@pytest.fixture(params=["local", "s3"])
def output_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_server").uri()


def test_uris_with_credentials_are_refused_and_local_forms_stay_local():
    with pytest.raises(StorageError, match="credentials"):
        check_uri("s3://AKIAEXAMPLE:secret@bucket/run")
    with pytest.raises(StorageError, match="secret_key"):
        check_uri("s3://bucket/run?access_key=a&secret_key=b")
    with pytest.raises(ConfigError, match="credentials"):
        load(None, ["output_dir=s3://key:secret@bucket/run"])
    assert load(None, ["output_dir=s3://bucket/run?region=eu-west-1"]).output_dir.startswith("s3://")
    assert not is_remote("runs/demo") and not is_remote("file:///tmp/x") and is_remote("gs://b/p")
    assert str(local_path("file:///tmp/x")) == "/tmp/x" and str(local_path("file:///tmp/a%20b")) == "/tmp/a b"
    for typo in ("s3:/bucket/run", "gs:bucket/run"):
        with pytest.raises(StorageError, match="mistyped"):
            check_uri(typo)
    local = RunDir("file:///tmp/gfr-local")
    assert local.root.is_local and os.fspath(local.data) == "/tmp/gfr-local/data"


def test_outputs_replace_old_ones_and_only_the_record_written_last_says_done(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    (run.at("out") / "a.txt").write_text("old")
    (run.at("out") / "stale.txt").write_text("old")
    run.record_stage("x", {"status": "done", "key": "k0"})

    run.begin_stage("x", "k1", ("out",))
    assert not run.stage_done("x", "k0") and not run.stage_done("x", "k1")
    assert not run.at("out").exists()  # no stale file can outlive a re-run
    (run.at("out") / "a.txt").write_text("new")
    assert not run.stage_done("x", "k1")  # outputs alone never make a stage done
    run.finish_stage("x", {"status": "done", "key": "k1"})
    assert run.stage_done("x", "k1") and run.at("out").files() == ["a.txt"]
    assert RunDir(output_dir).stage_done("x", "k1")  # a fresh driver sees the same record
    assert json.loads(run.at("manifest.json").read_text())["stages"]["x"]["key"] == "k1"

    run.begin_stage("y", "k", ("kept",), keep_outputs=True)  # a stage that resumes finished units
    (run.at("kept") / "unit").write_text("done")
    run.begin_stage("y", "k", ("kept",), keep_outputs=True)
    assert run.at("kept").files() == ["unit"]


def test_a_stage_replaces_only_what_the_manifest_records_this_tool_writing(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    writes = ("data", "rejects.parquet")
    (run.at("data") / "mine.csv").write_text("the user's own")
    with pytest.raises(ForeignOutput, match="already holds 'data', which this tool did not write"):
        run.begin_stage("data", "k", writes)
    assert run.at("data").files() == ["mine.csv"] and not run.at(MANIFEST).exists()  # nothing touched

    run.at("data").delete()
    run.begin_stage("data", "k", writes)
    (run.at("data") / "part-0.parquet").write_text("partial")
    run.fail_stage("data", "k", SourceError("cannot read in.jsonl.gz: Truncated compressed stream"))
    failed = RunDir(output_dir).stage_record("data")
    assert failed["status"] == "failed" and failed["outputs"] == list(writes)
    assert failed["reason"] == "cannot read in.jsonl.gz: Truncated compressed stream"
    run.begin_stage("data", "k", writes)  # a failed stage's outputs are its own: replaced
    assert not run.at("data").exists()

    run.at(MANIFEST).write_text("# my notes")
    with pytest.raises(StorageError, match="manifest.json is not a run manifest"):
        RunDir(output_dir).read_manifest()


def test_whole_object_writes_leave_no_temporary_files_and_folders_round_trip(output_dir, tmp_path):
    run = RunDir(output_dir)
    run.ensure_exists()
    for i in range(3):
        run.at("f.json").write_text(json.dumps({"v": i}))
    assert json.loads(run.at("f.json").read_text()) == {"v": 2}
    assert run.root.children() == ["f.json"]
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.bin").write_bytes(b"weights")
    (src / "loss.csv").write_text("step,loss\n")
    run.at("finetune/a").put(src)
    assert run.at("finetune/a").files() == ["loss.csv", "model/w.bin"]
    back = run.at("finetune/a/model").get(tmp_path / "back")
    assert (back / "w.bin").read_bytes() == b"weights"


def test_scratch_is_removed_after_the_stage_and_left_overs_by_the_next_driver(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    with run.scratch("data") as scratch:
        (scratch / "normalized" / "part-0.parquet").write_bytes(b"x")
        assert scratch.files() == ["normalized/part-0.parquet"]
    assert not scratch.exists()
    (run.at(".scratch/gradients-0badc0de") / "part").write_bytes(b"x")  # a killed driver's
    assert run.clean_scratch() == 1 and not run.at(".scratch").exists()
    (run.at(".scratch/gradients-0badc0de") / "part").write_bytes(b"x")
    (run.at(".scratch") / "my_notes.txt").write_bytes(b"a user's")  # not a name this tool gives: kept
    assert run.clean_scratch() == 1 and run.at(".scratch").children() == ["my_notes.txt"]


def test_a_missing_bucket_is_a_clear_error_before_any_work(s3_server):
    run = RunDir(s3_server.uri().replace("&allow_bucket_creation=true", ""))
    with pytest.raises(StorageError, match="cannot create or reach it"):
        run.ensure_exists()


def test_a_stage_refuses_to_read_a_stage_that_is_not_done_for_this_config(tmp_path):
    cfg = load(None, [f"output_dir={tmp_path / 'run'}"])
    run = RunDir(cfg.output_dir)
    run.record_stage("scoring", {"status": "done", "key": pipeline.stage_key("scoring", cfg)})
    # select reads ingest's rows itself (not only score's): an ingest that is running must stop it.
    run.record_stage("data", {"status": "running", "key": pipeline.stage_key("data", cfg)})
    with pytest.raises(pipeline.StageOrderError, match="'data'"):
        pipeline.run_stage("selection", cfg, run, log=lambda _: None)


HOLDER = """
import sys, time
from gradfilter_ray.driver_claim import DriverClaim
from gradfilter_ray.data.sources import SourceError
from gradfilter_ray.rundir import MANIFEST, ForeignOutput, RunDir
claim = DriverClaim(RunDir(sys.argv[1]).root, heartbeat_s=0.2, settle_s=0.05).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_driver_is_refused_while_the_first_lives_and_takes_over_once_it_died(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    first = subprocess.Popen([sys.executable, "-c", HOLDER, output_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirInUse) as refused:
            DriverClaim(run.root, settle_s=0.05).acquire()
        message = str(refused.value)
        assert f"pid {first.pid}" in message and socket.gethostname() in message and "started 20" in message
    finally:
        first.kill()
        first.wait()
    # Killed without releasing: its claim is still there, but its process is gone on this host.
    assert json.loads(run.at(CLAIM_FILE).read_text())["pid"] == first.pid
    with DriverClaim(run.root, settle_s=0.05):
        assert json.loads(run.at(CLAIM_FILE).read_text())["pid"] == os.getpid()
    assert not run.at(CLAIM_FILE).exists()  # released on exit


def test_a_claim_from_another_host_holds_while_its_heartbeat_is_fresh_and_expires_after(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    elsewhere = {"host": "head-pod-0", "pid": 1, "started": "2026-12-01T00:00:00Z", "token": "t"}
    run.at(CLAIM_FILE).write_text(json.dumps({**elsewhere, "heartbeat": time.time()}))
    with pytest.raises(OutputDirInUse, match="host head-pod-0, pid 1, started 2026-12-01T00:00:00Z"):
        DriverClaim(run.root, ttl_s=60, settle_s=0.01).acquire()
    run.at(CLAIM_FILE).write_text(json.dumps({**elsewhere, "heartbeat": time.time() - 61}))
    claim = DriverClaim(run.root, ttl_s=60, settle_s=0.01).acquire()
    claim.release()


def test_the_cli_stops_a_second_driver_with_exit_3_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "gradfilter_ray", "data", "--set", f"output_dir={out}"]
            + ["--set", "data.path=bundled:alpaca_sample_1k.json"],  # an input the look before the claim accepts
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 3, second.stderr
    assert f"pid {first.pid}" in second.stderr and "in use by another driver" in second.stderr


def test_a_driver_whose_claim_was_taken_over_stops_writing_and_leaves_the_new_claim(output_dir):
    run = RunDir(output_dir)
    run.ensure_exists()
    claim = DriverClaim(run.root, heartbeat_s=3600, settle_s=0.01).acquire()  # beats are driven by hand below
    run.guard = claim.check
    run.record_stage("x", {"status": "done", "key": "k"})
    assert claim.beat() and claim.lost_to is None
    other = {"host": "head-pod-1", "pid": 7, "started": "2026-12-01T01:00:00Z", "token": "theirs"}
    run.at(CLAIM_FILE).write_text(json.dumps({**other, "heartbeat": time.time()}))  # e.g. after a long outage
    assert not claim.beat()
    with pytest.raises(OutputDirInUse, match="lost its claim to another .host head-pod-1, pid 7"):
        run.record_stage("x", {"status": "done", "key": "k2"})
    claim.release()
    assert json.loads(run.at(CLAIM_FILE).read_text())["token"] == "theirs"  # neither overwritten nor removed
    assert RunDir(output_dir).stage_done("x", "k")
