"""A real submission: start a local Ray head (loopback, own temp dir and ports), `ray job submit` the demo pipeline,
wait for SUCCEEDED and check the outputs; a bad config must end FAILED with the config error in the logs. The head
is stopped by its own process group and processes (never `ray stop`, which would kill every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_TARGET_AND_EVALUATION, set_args

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


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
            head.wait(timeout=10)  # `ray start --block` rarely exits on SIGTERM alone: don't wait long for it
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for pid in processes_mentioning(temp_dir):  # daemons that left the group: ours by their temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


def test_ray_job_submit_runs_the_demo_pipeline(ray_head, tmp_path):
    address, env = ray_head
    out_dir = tmp_path / "job-run"
    done = submit(
        address,
        env,
        "gfr-demo",
        "--config",
        "jobs/configs/demo.yaml",
        *set_args(
            f"output_dir={out_dir}",
            "data.limit=24",
            "ensemble.members=2",
            "proxy.max_length=128",
            *TINY_TARGET_AND_EVALUATION,  # the DeepSpeed workers and the evaluation run under the submitted job too
        ),
    )
    assert job_status(address, env, "gfr-demo") == "SUCCEEDED", done.stdout[-4000:] + done.stderr[-2000:]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["stages"]["data"]["rows_in"] == 24
    assert manifest["stages"]["gradients"]["rows"] == manifest["stages"]["data"]["rows_kept"]
    assert pq.read_table(out_dir / "scoring" / "scores.parquet").num_rows == manifest["stages"]["gradients"]["rows"]
    assert (out_dir / "selection" / "gsnr_0.1.jsonl").exists() and (out_dir / "report" / "index.html").exists()
    assert (out_dir / "finetune" / "gsnr_0.15" / "model" / "model.safetensors").exists()
    assert (out_dir / "evaluation" / "compare.csv").read_text().count("gsnr_0.15") == 1
    assert "rows in: 24" in done.stdout


def test_a_bad_config_fails_the_job_with_the_error_in_its_logs(ray_head):
    address, env = ray_head
    submit(address, env, "gfr-bad", "--config", "jobs/configs/demo.yaml", "--set", "ensemble.memberz=3")
    assert job_status(address, env, "gfr-bad") == "FAILED"
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, "gfr-bad"], env=env, capture_output=True, text=True
    ).stdout
    assert "config error" in logs and "ensemble.memberz" in logs
