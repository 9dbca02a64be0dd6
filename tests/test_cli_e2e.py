"""End to end through the CLI, as `make run` does it, on the multi-turn chat demo config (real ShareGPT
tool-calling conversations through a chat template) with small overrides, writing to an object store (s3:// on a
local S3 server): the session's `s3_demo_run` (tests/cli_runs.py). Every stage's Ray workers read and write through
the store, the server counts the bytes each process moves (the driver's are a small
fraction), a second driver finds everything done, and `compare` rebuilds the comparison without fetching the model.
Local run directories are covered end to end by the tiny runs (test_reproducibility.py, test_fault_*.py) and
`ray job submit` by test_ray_job_submit.py."""

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
from cli_runs import S3_DEMO_MEMBERS, S3_DEMO_ROWS

from gradfilter_ray.rundir import RunDir

pytestmark = pytest.mark.slow
# The driver moves only the manifest, its claim, stage summaries, evaluation's small result files and Ray Data's
# planning reads of Parquet footers: a fixed amount that does not grow with models or corpus (tens of KB a stage).
DRIVER_SHARE_LIMIT = 0.08  # of all bytes moved to and from the store (measured: 3.2 % with the demo's tiny models)
DRIVER_BYTES_LIMIT = 400_000


def read(where):
    return pq.read_table(where.path, filesystem=where.filesystem)


@pytest.fixture(scope="module")
def demo(s3_demo_run):
    first = s3_demo_run["first"]
    assert first["rc"] == 0, first["stdout"][-3000:] + first["stderr"][-3000:]
    return s3_demo_run


def test_demo_pipeline_through_the_cli_on_an_object_store(demo):
    stdout, driver = demo["first"]["stdout"], demo["first"]["pid"]
    moved = demo["bytes_by_pid"]
    total, by_driver = sum(moved.values()), moved.get(driver, 0)
    share = by_driver / total
    print(f"bytes to and from the store: total {total}, driver {by_driver} ({share:.2%}), {len(moved)} processes")
    driver_paths = {p: n for (pid, p), n in demo["bytes_by_pid_and_path"].items() if pid == driver}
    print("driver bytes by top-level path:", dict(sorted(driver_paths.items(), key=lambda kv: -kv[1])))
    assert total > 1_000_000 and 0 < by_driver < DRIVER_BYTES_LIMIT and share < DRIVER_SHARE_LIMIT, moved
    assert demo["left_after_first"] == []  # a clean exit shuts its Ray down

    run = RunDir(demo["uri"])
    manifest = run.read_manifest()
    ingest = manifest["stages"]["data"]
    assert ingest["rows_in"] == S3_DEMO_ROWS == ingest["rows_kept"] + ingest["rows_rejected"]
    data = read(run.data)
    assert data.num_rows == ingest["rows_kept"]
    assert manifest["versions"]["ray"].startswith("2.60") and manifest["config"]["data"]["limit"] == S3_DEMO_ROWS
    # conversations kept whole and trained through the chat template: several answers under the loss in a row
    assert any(len(json.loads(c)) > 2 for c in data["conversation"].to_pylist())
    assert manifest["stages"]["tokens"]["skipped_by_reason"] == {}
    # the functions a conversation may call, kept and written by the demo's template as context
    tools = [t for t in data["tools"].to_pylist() if t is not None]
    assert manifest["stages"]["tokens"]["rows_with_tools"] == len(tools) > 0
    assert manifest["stages"]["tokens"]["template_renders_tools"] is True
    spans = read(run.tokens)["loss_spans"].to_pylist()
    assert any(len(s) > 2 for s in spans)
    assert len(manifest["inputs"][0]["sha256"]) == 64

    members = S3_DEMO_MEMBERS
    assert manifest["stages"]["ensemble"]["members"] == members == manifest["stages"]["ensemble"]["members_trained"]
    units = manifest["stages"]["ensemble"]["units"]  # each member's folder, named by its seed and key
    assert sorted(units) == [f"member_{m}" for m in range(members)] and len(set(units.values())) == members
    for m in range(members):
        assert units[f"member_{m}"].startswith(f"ensemble/member_seed{42 + m}-")
        assert (run.member_epoch(m, 2) / "adapter_model.safetensors").exists()
    grads = read(run.gradients)
    assert sorted(grads["id"].to_pylist()) == sorted(data["id"].to_pylist())
    assert len(grads["sq_norm_late"][0].as_py()) == members
    scores = read(run.scores)
    assert sorted(scores["id"].to_pylist()) == sorted(grads["id"].to_pylist())
    select = manifest["stages"]["selection"]["selections"]
    assert {"gsnr_0.05", "gsnr_0.1", "gsnr_0.15", "random_0.1", "ifd_0.1", "length_0.15"} <= set(select)
    for name, counts in select.items():
        lines = (run.selection / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == counts["selected"]
        assert all("conversations" in json.loads(line) for line in lines)  # written back as ShareGPT records
    assert (run.at("report") / "index.html").exists()

    subset = run.at(manifest["stages"]["finetune"]["units"]["gsnr_0.15"])  # finetune/gsnr_0.15-{key}
    model = subset / "model" / "model.safetensors"
    assert model.exists() and (subset / "model" / "chat_template.jinja").exists()
    assert (subset / "train_loss.csv").read_text().startswith("step,loss\n1,")
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((run.evaluation / "compare.csv").read_text()))}
    assert set(rows) == {"gsnr_0.15"} and all(float(r["heldout_loss"]) > 0 for r in rows.values())
    assert "judge skipped: evaluation.judge.base_url is not set" in stdout
    assert manifest["stages"]["evaluation"]["judge"] == "skipped" and manifest["stages"]["finetune"]["runs"] == 1
    assert manifest["stages"]["evaluation"]["generated"] == ["gsnr_0.15"]
    assert (run.at(manifest["stages"]["evaluation"]["units"]["gsnr_0.15"]) / "generations.jsonl").exists()
    assert not run.at(".scratch").files() and not run.at("driver_claim.json").exists()
    # the closing summary
    assert f"rows in: {S3_DEMO_ROWS}" in stdout and str(run.at("report") / "index.html") in stdout


def test_workers_read_and_write_the_store_themselves(demo):
    """What Ray workers read from the store shows in its request log: the tokenising tasks read data/, ensemble
    and extraction read tokens/, the fine-tuning workers the subset, the evaluation actor the model; checkpoints go
    to .ray_train*."""
    requests = demo["requests"]
    subset = RunDir(demo["uri"]).read_manifest()["stages"]["finetune"]["units"]["gsnr_0.15"]  # gsnr_0.15-{key}

    def fetched(fragment):
        return [r for r in requests if "GET /" in r and fragment in r]

    assert fetched("/demo/data/part-"), "no worker read data/ from the store"
    assert fetched("/demo/tokens/"), "no worker read tokens/ from the store"
    assert fetched("/demo/selection/gsnr_0.15.parquet"), "the fine-tuning workers did not read the subset"
    assert fetched(f"/demo/{subset}/model/model.safetensors"), "the evaluation actor did not fetch the model"
    assert [r for r in requests if "PUT /" in r and "/demo/gradients/" in r]
    assert [r for r in requests if "PUT /" in r and "/demo/.ray_train_finetune/" in r]
    # the checkpoint at epoch 1's end: each rank staged its own shard and uploaded it itself, into the trainer's folder
    checkpoint_puts = [r for r in requests if "PUT /" in r and "/checkpoint_step_0000001/" in r]
    assert checkpoint_puts and any("zero_pp_rank_1" in r for r in checkpoint_puts)
    summary = json.loads((RunDir(demo["uri"]).at(subset) / "train_summary.json").read_text())
    assert summary["checkpoint_steps"] == [1] and summary["checkpoint_staged_bytes"] > 0
    assert summary["checkpoint_bytes"] >= summary["checkpoint_staged_bytes"]


def test_a_second_driver_finds_every_stage_done_starts_no_ray_and_compare_leaves_the_weights_in_the_store(demo):
    again = demo["again"]
    assert again["rc"] == 0, again["stdout"][-3000:] + again["stderr"][-3000:]
    assert "[gradients] already done" in again["stdout"] and "] running (" not in again["stdout"]
    assert "[finetune] already done" in again["stdout"] and "[evaluation] already done" in again["stdout"]
    # with nothing to run it started no Ray (the first driver's Ray left its session folder in the same kind of place)
    assert demo["first"]["ray_sessions"] and again["ray_sessions"] == []
    compare = demo["compare"]
    assert compare["rc"] == 0 and "| gsnr_0.15 |" in compare["stdout"], compare["stdout"][-2000:] + compare["stderr"]
    run = RunDir(demo["uri"])
    model = run.at(run.read_manifest()["stages"]["finetune"]["units"]["gsnr_0.15"]) / "model" / "model.safetensors"
    assert compare["bytes"] < len(model.read_bytes())  # the weights stayed in the store
