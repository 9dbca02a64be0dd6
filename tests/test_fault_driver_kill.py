"""A driver SIGKILLed (its whole process group) while an extraction actor is mid-stream loses only the shard in
flight: extraction is recorded "running", never done; the same command takes over the dead driver's claim, skips
the finished stages, keeps the extraction shards the dead run committed and computes only the others (anything else
the dead run left in the config's extraction folder, gradients/<key>/, is removed), removes left-over
scratch folders and finishes; the dead driver's Ray processes are found by their RAY_TMPDIR and are gone (or killed
by pid). The run is the session's `faulted_run` (tests/cli_runs.py); that its results equal a fault-free run's is
checked in test_reproducibility.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_runs import ROWS, STALE_GRADIENTS, extraction_folder, files_under, tiny_cfg

from gradfilter_ray import pipeline
from gradfilter_ray.driver_claim import CLAIM_FILE
from gradfilter_ray.gradients.shards import PLAN
from gradfilter_ray.rundir import SCRATCH, RunDir

pytestmark = pytest.mark.slow


def test_the_kill_landed_mid_extraction_and_left_extraction_not_done(faulted_run):
    cfg = tiny_cfg(faulted_run["out"])
    # Every stage before extraction recorded done, extraction "running" (begun, so not done), the actor (a process
    # of this run's Ray) held in its second shard: one shard committed, one in flight, two queued.
    at_kill = faulted_run["manifest_at_kill"]["stages"]
    before = list(pipeline.STAGES)[: list(pipeline.STAGES).index("gradients")]
    assert all(at_kill[stage]["status"] == "done" for stage in before), at_kill
    key, writes = pipeline.stage_key("gradients", cfg), list(pipeline.STAGES["gradients"].writes)
    assert at_kill["gradients"] == {"status": "running", "key": key, "outputs": writes}
    assert faulted_run["actor_is_ours_at_kill"] and faulted_run["ray_processes_at_kill"] >= 4
    assert faulted_run["first_rc"] == -signal.SIGKILL
    # Whatever the killed run wrote to its extraction folder in place, extraction is not done: only the record
    # written last by a finished stage says done, and the kill came before it. The folder was referenced before the
    # work began, so even the interrupted extraction is the config's (only `gc` removes it).
    after_kill = faulted_run["manifest_after_kill"]
    assert after_kill["stages"]["gradients"]["status"] == "running"
    assert after_kill["references"]["gradients"] == {key: [f"gradients/{key}"]}
    print(f"gradients/{key}/ after the kill: {faulted_run['gradients_after_kill']}")
    # The killed driver's claim on the run directory was left behind (and the resumed run took it over).
    assert faulted_run["claim_after_kill"]["pid"] == faulted_run["first_pid"]


def test_no_process_of_the_killed_driver_survives(faulted_run):
    print(f"killed driver's Ray: exited by themselves {faulted_run['exited_by_themselves']}")
    print(f"killed driver's Ray: killed by pid after 45 s {faulted_run['killed_by_pid']}")
    assert faulted_run["left_after_kill"] == [], faulted_run["left_after_kill"]


def test_the_same_command_resumes_skipping_the_finished_stages(faulted_run):
    out = faulted_run["out"]
    cfg = tiny_cfg(out)
    log = faulted_run["second_log"]
    assert faulted_run["second_rc"] == 0, log[-4000:]
    stages = [name for name, stage in pipeline.STAGES.items() if stage.in_run(cfg)]
    before = stages[: stages.index("gradients")]
    for stage in before:
        assert f"[{stage}] already done (key {pipeline.stage_key(stage, cfg)})" in log, stage
    assert "[gradients] running" in log and "[gradients] already done" not in log
    assert faulted_run["left_after_second"] == []  # a clean exit shuts its Ray down

    rundir = RunDir(str(out))
    manifest = rundir.read_manifest()
    at_kill = faulted_run["manifest_at_kill"]["stages"]
    for stage in before:  # the records are the first run's: skipped, not re-run
        assert manifest["stages"][stage] == at_kill[stage]
    core = stages[: stages.index("report") + 1]
    for stage in core:
        assert rundir.stage_done(stage, pipeline.stage_key(stage, cfg)), stage
    # Extraction kept the killed run's plan and the shards it committed (part and marker, by name) and computed only
    # the others; everything else the killed run left in its folder (the planted stale part included) is gone; the
    # dead run's scratch folder is gone and no new one is left.
    at_kill, after = faulted_run["gradients_after_kill"], faulted_run["gradients_after_second"]
    committed = [m for m in at_kill if m.startswith("_shards/") and m != PLAN]
    kept = {PLAN} | {name for m in committed for name in (m, m.split("/", 1)[1].replace(".json", ".parquet"))}
    assert committed and set(at_kill) & set(after) == kept, (at_kill, after)
    assert STALE_GRADIENTS not in after
    record = manifest["stages"]["gradients"]
    # the record maps the folder the extraction wrote, the only one in gradients/, and readers find it through it
    folder = extraction_folder(out)
    assert record["units"] == {"gradients": f"gradients/{folder.name}"}
    assert faulted_run["gradients_folders"] == [folder.name] and Path(rundir.gradients.path) == folder
    assert record["shards_resumed"] == len(committed) >= 1
    assert record["shards_computed"] == record["shards"] - len(committed) >= 2
    assert record["rows_computed"] < ROWS
    assert f"[gradients] {len(committed)}/{record['shards']} shards already committed" in log
    assert files_under(out / SCRATCH) == []
    assert not (out / CLAIM_FILE).exists()  # a clean exit releases its claim

    data_ids = np.sort(pq.read_table(rundir.data, columns=["id"])["id"].to_numpy())
    grads = pq.read_table(rundir.gradients).sort_by("id")
    np.testing.assert_array_equal(grads["id"].to_numpy(), data_ids)
    assert manifest["stages"]["gradients"]["rows"] == len(data_ids) == ROWS
    scores = pq.read_table(out / "scoring" / "scores.parquet", columns=["id"])
    assert sorted(scores["id"].to_pylist()) == data_ids.tolist()
    for name, counts in manifest["stages"]["selection"]["selections"].items():
        lines = (out / "selection" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == counts["selected"], name
        assert all({"instruction", "output"} <= set(json.loads(line)) for line in lines)
    assert (out / "report" / "index.html").stat().st_size > 0
