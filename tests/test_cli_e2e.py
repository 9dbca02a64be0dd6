"""End to end through the CLI, as `make run` does it, on the demo config with small overrides."""

import csv
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
        "data.limit=40",
        "--set",
        "ray.progress_bars=false",
        "--set",
        "ensemble.members=3",
        "--set",
        "proxy.max_length=160",
        # fine-tune one subset for a few steps and evaluate it on a handful of prompts
        "--set",
        "target.subsets=[gsnr]",
        "--set",
        "target.ratios=[0.15]",
        "--set",
        "target.epochs=1",
        "--set",
        "evaluation.test_sets=[vicuna]",
        "--set",
        "evaluation.max_prompts_per_set=2",
        "--set",
        "evaluation.max_new_tokens=8",
        "--set",
        "evaluation.heldout_limit=8",
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    ingest = manifest["stages"]["ingest"]
    assert ingest["rows_in"] == 40 == ingest["rows_kept"] + ingest["rows_rejected"]
    assert pq.read_table(out_dir / "data").num_rows == ingest["rows_kept"]
    assert manifest["versions"]["ray"].startswith("2.60") and manifest["config"]["data"]["limit"] == 40
    assert len(manifest["inputs"][0]["sha256"]) == 64

    assert manifest["stages"]["ensemble"]["members"] == 3
    for m in range(3):
        assert (out_dir / "ensemble" / f"member_{m}" / "epoch_2" / "adapter_model.safetensors").exists()
    grads = pq.read_table(out_dir / "gradients")
    assert sorted(grads["id"].to_pylist()) == sorted(pq.read_table(out_dir / "data")["id"].to_pylist())
    assert len(grads["sq_norm_late"][0].as_py()) == 3
    scores = pq.read_table(out_dir / "scores.parquet")
    assert sorted(scores["id"].to_pylist()) == sorted(grads["id"].to_pylist())
    select = manifest["stages"]["select"]["selections"]
    assert {"gsnr_0.05", "gsnr_0.1", "gsnr_0.15", "random_0.1", "ifd_0.1", "length_0.15", "full"} <= set(select)
    for name, counts in select.items():
        lines = (out_dir / "selected" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == counts["selected"]
    assert (out_dir / "report" / "index.html").exists()

    for run in ("gsnr_0.15",):
        assert (out_dir / "finetune" / run / "model" / "model.safetensors").exists()
        assert (out_dir / "finetune" / run / "train_loss.csv").read_text().startswith("step,loss\n1,")
    with (out_dir / "eval" / "compare.csv").open() as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"gsnr_0.15"} and all(float(r["heldout_loss"]) > 0 for r in rows.values())
    assert "judge skipped: evaluation.judge.base_url is not set" in done.stdout
    assert manifest["stages"]["evaluate"]["judge"] == "skipped" and manifest["stages"]["finetune"]["runs"] == 1

    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[extract] already done" in again.stdout
    assert "[finetune] already done" in again.stdout and "[evaluate] already done" in again.stdout
    compare = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradfilter_ray",
            "compare",
            "--config",
            "jobs/configs/demo.yaml",
            "--set",
            f"output_dir={out_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert compare.returncode == 0 and "| gsnr_0.15 |" in compare.stdout
