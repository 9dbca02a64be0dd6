"""The same config and seed run twice as separate CLI processes into two output folders (the session's reference run
and its faulted run, which was killed and resumed: tests/cli_runs.py) select identical ids from identical gradients,
and each manifest records the config, its hash, package versions, seeds and input checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_runs import tiny_cfg

from gradfilter_ray import pipeline
from gradfilter_ray.bundled import resolve
from gradfilter_ray.config import config_hash, to_dict
from gradfilter_ray.rundir import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(reference_run, faulted_run) -> list[Path]:
    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    assert faulted_run["second_rc"] == 0, faulted_run["second_log"][-4000:]
    return [reference_run["out"], faulted_run["out"]]


def test_same_config_and_seed_select_identical_ids_in_two_separate_runs(two_runs):
    first, second = (RunDir(str(p)) for p in two_runs)
    cfg = tiny_cfg(first.root)
    selections = first.read_manifest()["stages"]["selection"]["selections"]
    assert selections == second.read_manifest()["stages"]["selection"]["selections"]
    assert len(selections) == len(cfg.selection.ratios) * len(cfg.scoring.scorers)
    for name in selections:
        ids = [pq.read_table(r.root / "selection" / f"{name}.parquet")["id"].to_pylist() for r in (first, second)]
        assert sorted(ids[0]) == sorted(ids[1]), name
        assert ids[0] or not name.startswith("gsnr"), name
        lines = [(r.root / "selection" / f"{name}.jsonl").read_text().splitlines() for r in (first, second)]
        assert sorted(lines[0]) == sorted(lines[1]), name
    grads = [pq.read_table(r.gradients).sort_by("id") for r in (first, second)]
    assert grads[0]["id"].equals(grads[1]["id"])
    for column in ("sq_norm_early", "sq_norm_late", "loss_early", "loss_late"):
        np.testing.assert_allclose(
            np.array(grads[0][column].to_pylist()), np.array(grads[1][column].to_pylist()), rtol=1e-6, err_msg=column
        )
    # Members differ from each other (a seed that is ignored would make them equal), runs do not.
    late = np.array(grads[0]["sq_norm_late"].to_pylist())
    assert not np.allclose(late[:, 0], late[:, 1])
    ran = [name for name, stage in pipeline.STAGES.items() if stage.in_run(cfg)]
    for stage in ran[: ran.index("report") + 1]:
        keys = [r.read_manifest()["stages"][stage]["key"] for r in (first, second)]
        assert keys[0] == keys[1] == pipeline.stage_key(stage, cfg), stage


def test_manifest_records_config_hash_versions_seeds_and_input_checksums(two_runs):
    hashes = {RunDir(str(root)).read_manifest()["config_hash"] for root in two_runs}
    assert len(hashes) == 1  # the same config in two folders: one hash
    for root in two_runs:
        manifest = RunDir(str(root)).read_manifest()
        cfg = tiny_cfg(root)
        assert manifest["config"] == json.loads(json.dumps(to_dict(cfg)))
        assert manifest["config_hash"] == config_hash(cfg)
        assert manifest["seed"] == cfg.seed
        assert manifest["config"]["ensemble"]["seed"] == cfg.ensemble.seed
        assert manifest["config"]["scoring"]["random_seed"] == cfg.scoring.random_seed
        assert manifest["config"]["proxy"]["model"]["init_seed"] == cfg.proxy.model.init_seed
        versions = manifest["versions"]
        for package in ("python", "ray", "torch", "transformers", "peft", "pyarrow", "numpy"):
            assert versions.get(package), package
        assert versions["ray"].startswith("2.")
        data_file = Path(resolve(cfg.data.path))
        [entry] = manifest["inputs"]
        assert entry["path"] == str(data_file) and entry["bytes"] == data_file.stat().st_size
        assert entry["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
        # the last command on the run directory: the reference run's was `gradfilter-ray audit` (cli_runs.py)
        last = "audit" if root == two_runs[0] else "run"
        assert manifest["command"][0] == last and f"output_dir={root}" in manifest["command"]
        assert "git_sha" in manifest
