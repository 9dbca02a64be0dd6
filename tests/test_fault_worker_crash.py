"""A dead ensemble worker (rank 0 of the faulted run, os._exit after its epoch-1 checkpoint was registered) is
restarted by Ray Train with the whole group from that checkpoint, and the adapters equal the fault-free reference
run's (same config and seeds, uninterrupted); no worker leaves its private folder behind, dead or not."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from cli_runs import ROWS, int_lines, tiny_cfg

from gradfilter_ray.ensemble import stage as ensemble_stage
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.units import ensemble_members


@pytest.mark.slow
def test_the_crashed_group_restarts_from_the_checkpoint_and_matches_the_fault_free_run(faulted_run, reference_run):
    from safetensors.torch import load_file

    out, faults = faulted_run["out"], faulted_run["first_dir"]
    cfg = tiny_cfg(out)
    assert cfg.ensemble.max_failures >= 1
    assert (faults / "crashed").read_text().startswith("epoch 1 ")  # rank 0 really died after epoch 1
    starts = int_lines(faults / "starts.log")
    assert sorted((rank, epoch) for rank, epoch, _ in starts) == [(0, 1), (0, 2), (1, 1), (1, 2)], starts
    first_pids = {pid for _, epoch, pid in starts if epoch == 1}
    # the restarted group is new processes that began at epoch 2: it resumed from the epoch-1 checkpoint
    assert all(pid not in first_pids for _, epoch, pid in starts if epoch == 2)
    record = faulted_run["manifest_at_kill"]["stages"]["ensemble"]
    assert record["rows_trained"] == ROWS and record["members"] == 2

    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    rundir, clean = RunDir(str(out)), RunDir(str(reference_run["out"]))
    for m in range(cfg.ensemble.members):
        for e in range(1, cfg.ensemble.epochs + 1):
            got = load_file(str(rundir.member_epoch(m, e) / "adapter_model.safetensors"))
            want = load_file(str(clean.member_epoch(m, e) / "adapter_model.safetensors"))
            assert got.keys() == want.keys()
            for key in got:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"m{m} e{e} {key}")
    members = ensemble_members(cfg, rundir.stage_record("tokens")["key"])
    assert [f.path for f in rundir.member_folders()] == [(rundir.ensemble / m.folder).path for m in members]
    trainer = ensemble_stage.trainer_name(members)
    assert not (rundir.ensemble_train_state / trainer).exists()  # the finished stage removed its Ray Train run
    # The dead worker's private folder was removed by its successor, the finished workers removed their own, and
    # the extraction actors (one of them killed) left no adapter files: the runs' own TMPDIR holds none of them.
    left = faulted_run["tmpdir_after"]
    assert not [p for p in left if p.startswith(("gfr-adapters-", f"{ensemble_stage.WORK_ROOT}/"))], left


def test_a_new_member_worker_removes_the_folders_of_dead_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / ensemble_stage.WORK_ROOT
    (root / f"{dead.pid}-seed42-x" / "member_seed42-0123456789abcdef").mkdir(parents=True)
    (root / f"{os.getppid()}-seed43-y").mkdir()  # a live process's folder stays
    mine = ensemble_stage.member_workdir(45)
    assert sorted(p.name for p in root.iterdir()) == sorted([f"{os.getppid()}-seed43-y", mine.name])
    assert mine.name.startswith(f"{os.getpid()}-seed45-")
