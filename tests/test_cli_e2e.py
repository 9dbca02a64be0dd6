"""End to end through the CLI, as `make run` does it, on the demo config with small overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_through_the_cli(tmp_path):
    out_dir = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = [
        sys.executable,
        "-m",
        "gradfilter_ray",
        "run",
        "--config",
        "jobs/configs/demo.yaml",
        "--set",
        f"output_dir={out_dir}",
        "--set",
        "data.limit=60",
        "--set",
        "ray.progress_bars=false",
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    ingest = manifest["stages"]["ingest"]
    assert ingest["rows_in"] == 60 == ingest["rows_kept"] + ingest["rows_rejected"]
    assert pq.read_table(out_dir / "data").num_rows == ingest["rows_kept"]
    assert manifest["versions"]["ray"].startswith("2.60") and manifest["config"]["data"]["limit"] == 60
    assert len(manifest["inputs"][0]["sha256"]) == 64

    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert again.returncode == 0 and "[ingest] already done" in again.stdout
