"""The submission path: start a local Ray head (loopback, own temp dir and ports), `ray job submit` one cheap stage
(`data`) with the documented jobs/runtime_env.yaml, wait for SUCCEEDED and check that the job ran in that runtime
env (the uploaded working dir, its env_vars) on the cluster and wrote its outputs; a bad config must end FAILED with
the config error in the job's logs. The whole pipeline end to end is test_cli_e2e.py's (the same CLI, which
attaches to the cluster named by RAY_ADDRESS under `ray job submit`). The head is stopped by its own process group
and then by its processes (never `ray stop`, which would kill every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cli_runs import set_args, stop_processes_of

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="gfrj-", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    # Every port Ray would otherwise take by default (the agent's 52365, the client server's 10001, ...) is chosen
    # free here: the test session's own embedded Ray already holds the defaults.
    own_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
            "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
        )
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # 2.60 defaults to token mode, which the CLI would not follow
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            *own_ports,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the local Ray head did not come up within 120 s")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)  # `ray start --block` rarely exits on SIGTERM alone: don't wait long for it
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        # daemons that left the group (gcs, raylet, agents, workers): ours by their temp dir, killed by pid
        stop_processes_of(temp_dir, wait_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, submission_id: str, *pipeline_args: str) -> subprocess.CompletedProcess:
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
        "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/run.py", *pipeline_args,
    ]  # fmt: skip
    for _ in range(24):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        # The job server answers before the head's job agent is up on a busy machine: wait for it, then retry.
        if "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(5)
    return done


def job_status(address: str, env: dict, submission_id: str) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", address, submission_id],
        env=env,
        capture_output=True,
        text=True,
    )
    text = (out.stdout + out.stderr).lower()
    for state in ("succeeded", "failed", "stopped", "running", "pending"):
        if f"job '{submission_id}' {state}" in text or f"status: {state}" in text:
            return state.upper()
    return text


def test_ray_job_submit_runs_a_stage_on_the_cluster_in_the_runtime_env(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    address, env = ray_head
    out_dir = tmp_path / "job-run"
    overrides = set_args(f"output_dir={out_dir}", "data.limit=24", "ray.progress_bars=false")
    done = submit(address, env, "gfr-data", "data", "--config", "jobs/configs/tiny_gpt2.yaml", *overrides)
    assert job_status(address, env, "gfr-data") == "SUCCEEDED", done.stdout[-4000:] + done.stderr[-2000:]
    # The job ran in the runtime env of jobs/runtime_env.yaml: its working dir uploaded as a package, its env_vars.
    runtime_env = JobSubmissionClient(address).get_job_info("gfr-data").runtime_env
    assert runtime_env["working_dir"].startswith("gcs://_ray_pkg_"), runtime_env
    documented = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"] == documented["env_vars"], runtime_env
    # The stage attached to the cluster (its Ray Data tasks ran there) and committed its outputs.
    manifest = json.loads((out_dir / "manifest.json").read_text())
    record = manifest["stages"]["data"]
    assert record["status"] == "done" and record["rows_in"] == 24 == record["rows_kept"] + record["rows_rejected"]
    assert pq.read_table(out_dir / "data").num_rows == record["rows_kept"]
    assert manifest["command"][0] == "data" and "[data] done" in done.stdout


def test_a_bad_config_fails_the_job_with_the_error_in_its_logs(ray_head):
    address, env = ray_head
    submit(address, env, "gfr-bad", "--config", "jobs/configs/demo.yaml", "--set", "ensemble.memberz=3")
    assert job_status(address, env, "gfr-bad") == "FAILED"
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, "gfr-bad"], env=env, capture_output=True, text=True
    ).stdout
    assert "config error" in logs and "ensemble.memberz" in logs
