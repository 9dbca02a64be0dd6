"""`gradfilter-ray compare --config X` rebuilds X's comparison only: a run directory whose last finished evaluation
is another config's (its runs.json and judge.json are that config's view) is refused with the stage-order exit code
and the command that makes X's view, never shown as X's table. No Ray: the manifest records and view files are
written here as the evaluation stage writes them."""

from __future__ import annotations

import json

from gradfilter_ray import cli, pipeline
from gradfilter_ray.config import load
from gradfilter_ray.rundir import RunDir


def write_view(run: RunDir, cfg, name: str) -> None:
    """`cfg`'s evaluation recorded done, with a view of one run `name` (its loss curve under finetune/)."""
    folder = f"finetune/{name}-0123456789abcdef"
    (run.at(folder) / "train_loss.csv").write_text("step,loss\n1,2.0\n2,1.5\n")
    view = {name: {"scorer": "gsnr", "ratio": 0.1, "n_train": 10, "heldout_loss": 1.25, "finetune": folder}}
    (run.evaluation / "runs.json").write_text(json.dumps(view))
    (run.evaluation / "judge.json").write_text(json.dumps({"status": "skipped", "reason": "no judge"}))
    run.record_stage("evaluation", {"status": "done", "key": pipeline.stage_key("evaluation", cfg)})


def test_compare_shows_only_the_configs_own_finished_evaluation(tmp_path, capsys):
    output_dir = tmp_path / "run"
    ours, theirs = tmp_path / "ours.yaml", tmp_path / "theirs.yaml"
    ours.write_text(f"output_dir: '{output_dir}'\n")
    theirs.write_text(f"output_dir: '{output_dir}'\nevaluation:\n  max_new_tokens: 7\n")
    run = RunDir(str(output_dir))
    run.ensure_exists()

    assert cli.main(["compare", "--config", str(ours)]) == cli.EXIT_ORDER  # nothing evaluated yet
    assert f"run `gradfilter-ray evaluation --config {ours}` first" in capsys.readouterr().err

    write_view(run, load(str(theirs)), "theirs_0.1")
    assert cli.main(["compare", "--config", str(ours), "--set", "evaluation.heldout_limit=5"]) == cli.EXIT_ORDER
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no finished evaluation of this config" in err
    assert f"`gradfilter-ray evaluation --config {ours} --set evaluation.heldout_limit=5`" in err
    assert not (run.evaluation / "compare.md").exists()  # nothing rebuilt from the other config's view

    assert cli.main(["compare", "--config", str(theirs)]) == 0
    assert "| theirs_0.1 |" in capsys.readouterr().out

    write_view(run, load(str(ours)), "ours_0.1")
    assert cli.main(["compare", "--config", str(ours)]) == 0
    shown = capsys.readouterr().out
    assert "| ours_0.1 |" in shown and "theirs_0.1" not in shown
    assert "| ours_0.1 |" in (run.evaluation / "compare.md").read_text()
