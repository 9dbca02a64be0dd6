"""End to end through the CLI, as `make run` does it, on the demo config with small overrides, writing to an
object store (s3:// on a local S3 server). Local run directories are covered end to end by the `ray job submit`
test; here every stage's Ray workers read and write through the store, and a second driver with an empty
working copy finds everything done."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_TARGET_AND_EVALUATION, set_args

from gradfilter_ray import pipeline
from gradfilter_ray.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_through_the_cli_on_an_object_store(tmp_path, s3_server):
    uri = s3_server.uri("demo")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = [
        sys.executable,
        "-m",
        "gradfilter_ray",
        "run",
        "--config",
        "jobs/configs/demo.yaml",
        *set_args(
            f"output_dir={uri}",
            f"work_dir={tmp_path / 'driver1'}",
            "data.limit=40",
            "ensemble.members=3",
            "proxy.max_length=160",
            *TINY_TARGET_AND_EVALUATION,
        ),
    ]
    seen = len(s3_server.requests)
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    requests = s3_server.requests[seen:]

    # Everything is checked on a third copy, downloaded from the store alone.
    check = RunDir(uri, tmp_path / "check")
    check.pull()
    for stage in pipeline.STAGES:
        check.ensure_local(stage)
    out_dir = check.root
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

    # The driver produced every stage locally, so what Ray workers read from the store shows in its request log:
    # ensemble and extract actors read data/, the fine-tuning workers the subset, the evaluation actor the model;
    # the workers' writes land in a staging prefix that is removed afterwards; checkpoints go to .ray_train*.
    def fetched(fragment):
        return [r for r in requests if "GET /" in r and fragment in r]

    assert fetched("/demo/data/part-"), "no worker read data/ from the store"
    assert fetched("/demo/selected/gsnr_0.15.parquet"), (
        "the fine-tuning workers did not read the subset from the store"
    )
    assert fetched("/demo/finetune/gsnr_0.15/model/model.safetensors"), "the evaluation actor did not fetch the model"
    assert [r for r in requests if "PUT /" in r and "/demo/.staging-extract-" in r]
    assert [r for r in requests if "PUT /" in r and "/demo/.ray_train_finetune/" in r]
    assert not [n for n in check.store.top_level() if n.startswith(".staging-")]

    # A second driver with an empty working copy (a new pod) finds every stage done in the store.
    args[args.index(f"work_dir={tmp_path / 'driver1'}")] = f"work_dir={tmp_path / 'driver2'}"
    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[extract] already done" in again.stdout and "] running (" not in again.stdout
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
            f"output_dir={uri}",
            "--set",
            f"work_dir={tmp_path / 'driver3'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert compare.returncode == 0 and "| gsnr_0.15 |" in compare.stdout, (
        compare.stdout[-2000:] + compare.stderr[-2000:]
    )
    assert not (tmp_path / "driver3" / "finetune" / "gsnr_0.15" / "model").exists()  # weights stayed in the store
