"""Finetune (DeepSpeed on Ray Train, 2 CPU workers, gloo) and evaluate (Ray Data batch inference, a judge over
real HTTP) on the bundled tiny LLaMA (stories260K): the loss falls, the model loads back, a preempted run resumes
to the uninterrupted run's curve, ZeRO-3 trains the same model as ZeRO-2, the comparison table is right, and a
judge swapped redoes exactly the verdicts it changes. A subset added (through the CLI, end to end):
tests/test_rerun_units.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ChatServer, reply
from safetensors.torch import load_file

from gradfilter_ray import pipeline
from gradfilter_ray.config import load
from gradfilter_ray.evaluation import pws
from gradfilter_ray.evaluation.keys import run_key
from gradfilter_ray.finetune import stage as finetune_stage
from gradfilter_ray.finetune import worker as finetune_worker
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.storage import Location
from gradfilter_ray.units import unit_finished

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # Ray Train (DeepSpeed) runs
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
# ZeRO-2 in fp32 checkpoints 16 bytes a parameter: the weights, and the optimiser's fp32 master copy and two moments
PRETRAINED = REPO / "gradfilter_ray" / "assets" / "models" / "stories260K" / "model.safetensors"
N_PARAMS = sum(t.numel() for t in load_file(PRETRAINED).values())
ROWS = json.loads((REPO / "gradfilter_ray" / "assets" / "data" / "alpaca_sample_1k.json").read_text())
SMALL = [
    "finetune.scorers=[gsnr, random]",
    "selection.ratios=[0.5]",
    "finetune.ratios=[0.5]",
    "finetune.max_length=256",
    "finetune.epochs=2",
    "finetune.effective_batch_size=8",
    "finetune.micro_batch_size=4",
    "finetune.learning_rate=0.003",
    "evaluation.test_sets=[vicuna, koala]",
    "evaluation.max_prompts_per_set=3",
    "evaluation.max_new_tokens=12",
    "evaluation.heldout_limit=10",
]


def write_selected(root: Path, name: str, first: int, n: int) -> None:
    """A subset of rows [first, first + n) of the sample as the select stage writes it (canonical columns)."""
    rows = ROWS[first : first + n]
    table = pa.table(
        {
            "id": pa.array(range(first, first + n), pa.int64()),
            "instruction": pa.array([r["instruction"] for r in rows], pa.string()),
            "input": pa.array([r["input"] for r in rows], pa.string()),
            "output": pa.array([r["output"] for r in rows], pa.string()),
        }
    )
    (root / "selection").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "selection" / f"{name}.parquet")


def make_selected(root: Path) -> None:
    """Two 24-row subsets."""
    write_selected(root, "gsnr_0.5", 0, 24)
    write_selected(root, "random_0.5", 24, 24)


def small_cfg(out: Path, *extra: str):
    return load(DEMO, [f"output_dir={out}", *SMALL, *extra])


QUIET = {"log": lambda _: None}


def record_upstream(rundir: RunDir, cfg) -> None:
    """The stages up to select recorded done for `cfg`."""
    for stage in ("data", "ensemble", "gradients", "scoring", "selection"):
        rundir.record_stage(stage, {"status": "done", "key": pipeline.stage_key(stage, cfg)})


def selected_run(root: Path, cfg) -> RunDir:
    """`root` with the two subsets of `make_selected` and the stages up to select recorded done for `cfg`."""
    make_selected(root)
    rundir = RunDir(str(root))
    record_upstream(rundir, cfg)
    return rundir


def subset_of(cfg, rundir: RunDir, name: str) -> finetune_stage.Subset:
    subsets, _ = finetune_stage.plan_subsets(cfg, rundir)
    return next(s for s in subsets if s.name == name)


def files_of(folder: Location) -> dict[str, tuple[str, int]]:
    """Every file under a folder: its sha256 and its mtime (a file written anew, even alike, has a new one)."""
    root = Path(folder)
    return {
        str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def read_losses(path: Location) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(io.StringIO(path.read_text()))]


class LongerAnswerJudge(ChatServer):
    """An OpenAI-compatible endpoint that rates the longer answer 8 and the other 4 (equal: 5 5), and replies
    with no scores for one scripted question, so the expected outcomes can be computed independently."""

    def __init__(self, garbled_question: str) -> None:
        def respond(body: dict) -> tuple:
            prompt = body["messages"][-1]["content"]
            one = re.search(r"Assistant 1's Answer\]\n(.*?)\n\n\[The End of Assistant 1", prompt, re.S).group(1)
            two = re.search(r"Assistant 2's Answer\]\n(.*?)\n\n\[The End of Assistant 2", prompt, re.S).group(1)
            if garbled_question in prompt:
                return reply("I cannot decide.")
            if len(one) == len(two):
                return reply("5 5\nequal")
            return reply("8 4\nfirst longer" if len(one) > len(two) else "4 8\nsecond longer")

        super().__init__(respond)
        self.url += "/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)


OTHER_TRAINER = "finetune-0123abcd0123abcd-gsnr_0.5"


@pytest.fixture(scope="module")
def finetuned(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "run"
    cfg = small_cfg(root)
    rundir = selected_run(root, cfg)
    # Another config's interrupted subset: it is that config's to resume (or `gc`'s to remove), never this stage's.
    (rundir.finetune_train_state / OTHER_TRAINER / "checkpoint_step_0000002" / "x").write_bytes(b"x")
    counts = pipeline.run_stage("finetune", cfg, rundir, **QUIET)
    return cfg, rundir, counts


def test_finetune_loss_falls_and_the_model_loads_back(finetuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cfg, rundir, counts = finetuned
    assert counts["runs"] == 2 and not counts["skipped"] and sorted(counts["trained"]) == ["gsnr_0.5", "random_0.5"]
    # this config's trainer folders were dropped as each subset finished; the other config's stays as it was
    assert rundir.finetune_train_state.children() == [OTHER_TRAINER]
    subsets = {s.name: s for s in finetune_stage.plan_subsets(cfg, rundir)[0]}
    for run in ("gsnr_0.5", "random_0.5"):
        subset = subsets[run]
        assert counts["units"][run] == f"finetune/{run}-{subset.key}"
        folder = rundir.at(counts["units"][run])
        losses = read_losses(folder / "train_loss.csv")
        summary = json.loads((folder / "train_summary.json").read_text())
        # global batch 8 (2 workers x 4, no accumulation), 2 epochs of ceil(rows / 8) steps.
        assert summary["rows_trained"] + summary["rows_no_response_tokens"] == 24 and summary["rows_trained"] > 16
        assert summary["global_batch"] == 8 and len(losses) == summary["total_steps"] == 6
        # the checkpoint policy: epoch 1's end only (none after the last step, where the final save follows),
        # written by the ranks straight into the run directory (nothing staged on local disk and copied)
        assert summary["checkpoint_steps"] == [3] and summary["checkpoints"] == 1
        assert summary["checkpoint_bytes"] > 12 * N_PARAMS and summary["checkpoint_staged_bytes"] == 0
        assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
        assert (folder / "model" / "model.safetensors").exists()
        model = AutoModelForCausalLM.from_pretrained(str(folder / "model"))
        assert isinstance(model, LlamaForCausalLM)
        assert AutoTokenizer.from_pretrained(str(folder / "model")).vocab_size == 512
        # written last, the subset's marker holds its key; its Ray Train run (checkpoints) is removed
        assert unit_finished(folder, subset.key)
        assert not unit_finished(folder, counts["key"])  # the subset's key, not the stage's
        assert not (rundir.finetune_train_state / subset.trainer).exists()
    assert sorted(rundir.finetune.children()) == sorted(
        [*(rundir.at(u).name for u in counts["units"].values()), "summary.json"]
    )
    # every subset's folder and trainer are referenced by the stage key, for gc
    referenced = rundir.references("finetune", counts["key"])
    assert referenced == {*counts["units"].values(), *(f".ray_train_finetune/{s.trainer}" for s in subsets.values())}
    view = json.loads((rundir.finetune / "summary.json").read_text())["runs"]
    assert {run: v["folder"] for run, v in view.items()} == counts["units"]
    assert view["gsnr_0.5"]["train"]["total_steps"] == counts["steps"]["gsnr_0.5"]


def test_a_rerun_after_a_crash_keeps_the_finished_subsets(finetuned):
    """Crashed after both subsets finished but before the stage's record: the stage is not done, and its re-run
    trains nothing again (each finished subset has its marker); it only writes the summary and the record."""
    cfg, rundir, counts = finetuned

    def written(run: str) -> dict[str, int]:  # a retrained subset's files are written anew
        folder = Path(rundir.at(counts["units"][run]))
        return {f: (folder / f).stat().st_mtime_ns for f in ("model/model.safetensors", finetune_worker.DONE_MARKER)}

    before = {run: written(run) for run in counts["steps"]}
    rundir.begin_stage("finetune", counts["key"], pipeline.STAGES["finetune"].writes, keep_outputs=True)
    assert not rundir.stage_done("finetune", counts["key"])
    again = pipeline.run_stage("finetune", cfg, rundir, **QUIET)
    assert again["seconds"] < 30 and again["runs"] == 2 and again["steps"] == counts["steps"]
    assert again["trained"] == [] and sorted(again["reused"]) == ["gsnr_0.5", "random_0.5"]
    assert rundir.finetune_train_state.children() == [OTHER_TRAINER]
    assert {run: written(run) for run in counts["steps"]} == before
    assert rundir.stage_done("finetune", counts["key"])


def test_preempted_zero3_finetune_resumes_to_the_zero2_curve_and_weights(finetuned, tmp_path):
    """One run checks two things: resuming from a mid-run checkpoint, and ZeRO-3 (partitioned parameters) training
    the same model as ZeRO-2; the uninterrupted ZeRO-2 run of the fixture is the reference for both."""

    _, reference, _ = finetuned
    root = tmp_path / "run"
    cfg = small_cfg(
        root, "finetune.scorers=[gsnr]", "finetune.checkpoint=steps", "finetune.checkpoint_every_steps=2",
        "finetune.zero_stage=3",
    )  # fmt: skip
    rundir = selected_run(root, cfg)
    subset = subset_of(cfg, rundir, "gsnr_0.5")
    # the ZeRO stage and the checkpoint policy change how it trains, not what: the fixture's subset has this key;
    # its trainer is another (a ZeRO-2 checkpoint does not load into ZeRO-3)
    reference_subset = subset_of(finetuned[0], reference, "gsnr_0.5")
    assert subset.key == reference_subset.key and subset.trainer != reference_subset.trainer
    partial = finetune_stage.build_trainer(cfg, rundir, subset, stop_after_steps=4).fit()
    assert partial.error is None and partial.metrics["step"] == 4  # the checkpoint at step 4 is the latest
    folder = rundir.finetune / subset.folder
    assert not unit_finished(folder, subset.key)  # stopped: no model, no marker
    # the ranks wrote into the trainer's folder; Ray Train kept only the latest checkpoint, beside the shared tokens
    trainer = rundir.finetune_train_state / subset.trainer
    assert [c for c in trainer.children() if c.startswith("checkpoint_step_")] == ["checkpoint_step_0000004"]
    assert sorted(t for t in (trainer / "tokens").children()) == ["part-00000.parquet", "part-00001.parquet"]
    pipeline.run_stage("finetune", cfg, rundir, **QUIET)
    resumed = read_losses(folder / "train_loss.csv")
    uninterrupted = read_losses(reference.finetune / subset.folder / "train_loss.csv")
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)
    # every 2 steps, never after the last: steps 2 and 4 (written before the stop, and counted on after it)
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["checkpoint_steps"] == [2, 4] and summary["checkpoints"] == 2
    z3 = load_file(str(folder / "model" / "model.safetensors"))
    z2 = load_file(str(reference.finetune / subset.folder / "model" / "model.safetensors"))
    pretrained = load_file(PRETRAINED)
    assert z3.keys() == z2.keys()
    moved = 0.0
    for name in z2:  # partitioned vs replicated reductions differ in summation order only
        np.testing.assert_allclose(z3[name].numpy(), z2[name].numpy(), atol=1e-4, err_msg=name)
        moved = max(moved, float(np.abs(z2[name].numpy() - pretrained[name].numpy()).max()))
    assert moved > 1e-3  # and training really changed the weights


def test_without_checkpoints_a_failed_worker_group_restarts_the_subset_from_its_first_step(finetuned, tmp_path):
    """checkpoint: none with max_failures 1: the worker fails after step 3 (through the stage's fault seam); Ray
    Train restarts the group, which finds no checkpoint and trains the subset again from step 1, having written no
    checkpoint at any step. One worker accumulating two micro-batches trains the rows of an optimiser step that the
    fixture's two workers share: the same subset key, and the fixture's loss curve."""
    finetuned_cfg, reference, _ = finetuned
    root = tmp_path / "run"
    cfg = small_cfg(
        root, "finetune.scorers=[gsnr]", "finetune.checkpoint=none", "finetune.max_failures=1",
        "finetune.num_workers=1",
    )  # fmt: skip
    rundir = selected_run(root, cfg)
    seen, failed = str(tmp_path / "seen.jsonl"), str(tmp_path / "failed")

    def fails_once_after_step_3(config: dict) -> None:
        import json as json_
        import os
        from pathlib import Path as Path_

        from gradfilter_ray import faults
        from gradfilter_ray.finetune.worker import finetune_worker

        trainer = Path_(config["train_state"].path)

        def handler(name: str, rank: int, step: int, loss: float, pid: int) -> None:
            saved = sorted(p.name for p in trainer.glob("checkpoint_step_*"))
            with open(seen, "a") as fh:
                fh.write(json_.dumps({"rank": rank, "step": step, "loss": loss, "pid": pid, "saved": saved}) + "\n")
            if step == 3 and not os.path.exists(f"{failed}-{rank}"):  # the first attempt only
                open(f"{failed}-{rank}", "w").close()
                raise RuntimeError("injected worker failure after step 3")

        faults._handler, faults._loaded = handler, True
        finetune_worker(config)

    subset = subset_of(cfg, rundir, "gsnr_0.5")
    assert subset.key == subset_of(finetuned_cfg, reference, "gsnr_0.5").key
    assert finetune_stage.fit_subset(cfg, rundir, subset, train_fn=fails_once_after_step_3) == "gsnr_0.5"
    records = [json.loads(line) for line in Path(seen).read_text().splitlines()]
    assert {r["rank"] for r in records} == {0}
    assert [r["step"] for r in records] == [1, 2, 3, 1, 2, 3, 4, 5, 6]  # failed after 3, then from the first step
    assert len({r["pid"] for r in records[:3]} | {r["pid"] for r in records[3:]}) == 2  # a new worker process
    np.testing.assert_allclose([r["loss"] for r in records[3:6]], [r["loss"] for r in records[:3]], rtol=1e-6)
    assert all(r["saved"] == [] for r in records)  # nothing resumable was ever written
    folder = rundir.finetune / subset.folder
    losses = read_losses(folder / "train_loss.csv")
    np.testing.assert_allclose(losses, [r["loss"] for r in records][3:], rtol=1e-6)
    np.testing.assert_allclose(losses, read_losses(reference.finetune / subset.folder / "train_loss.csv"), rtol=1e-5)
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["checkpoints"] == 0 and summary["checkpoint_steps"] == [] and summary["total_steps"] == 6
    assert summary["global_batch"] == 8  # 1 worker x 4 rows x 2 accumulated


def test_evaluate_generates_scores_heldout_judges_and_compares(finetuned):
    """The stage on the fixture's two runs with a judge; then a judge timeout changed redoes nothing, another judge
    model re-judges the pair and generates nothing, and the first model again (its pair's file removed) is
    answered from the judge cache. Answers generated are counted by their files' mtimes, judge calls by the
    server."""
    from gradfilter_ray.evaluation.testsets import load_test_set

    _, base, finetune_counts = finetuned
    garbled = load_test_set("koala")[0]["instruction"]
    judge = LongerAnswerJudge(garbled)
    ev = base.evaluation
    try:
        judged_by = [f"evaluation.judge.base_url={judge.url}", "evaluation.judge.concurrency=2"]
        cfg = small_cfg(base.root, *judged_by)
        counts = pipeline.run_stage("evaluation", cfg, base, **QUIET)
        first_calls = judge.calls
        folders = {run: base.at(counts["units"][run]) for run in ("gsnr_0.5", "random_0.5")}
        answers = {run: files_of(folder) for run, folder in folders.items()}
        pair = base.at(counts["units"]["gsnr_0.5_vs_random_0.5"])
        outcomes = pair.read_text()

        # how long to wait for the judge keys nothing: the stage is done, nothing runs
        slower = pipeline.run_stage(
            "evaluation", small_cfg(base.root, *judged_by, "evaluation.judge.timeout_s=7"), base, **QUIET
        )
        assert slower["key"] == counts["key"] and judge.calls == first_calls
        assert {run: files_of(folder) for run, folder in folders.items()} == answers

        # another judge model: the runs are kept, only the pair is judged (a new file beside the first)
        other = pipeline.run_stage(
            "evaluation", small_cfg(base.root, *judged_by, "evaluation.judge.model=judge-2"), base, **QUIET
        )
        assert other["generated"] == [] and other["judged"] == ["gsnr_0.5_vs_random_0.5"]
        assert judge.calls == 2 * first_calls and {r["body"]["model"] for r in judge.requests[first_calls:]} == {
            "judge-2"
        }
        assert {run: files_of(folder) for run, folder in folders.items()} == answers
        assert other["units"]["gsnr_0.5_vs_random_0.5"] != pair_path(counts) and pair.read_text() == outcomes

        # the first model again, its pair's file gone: judged again from the cache, no request paid twice
        pair.delete()
        again = pipeline.run_stage("evaluation", cfg, base, **QUIET)
        assert (
            again["key"] == counts["key"]
            and again["generated"] == []
            and again["judged"] == ["gsnr_0.5_vs_random_0.5"]
        )
        assert judge.calls == 2 * first_calls and pair.read_text() == outcomes
        assert {run: files_of(folder) for run, folder in folders.items()} == answers

        # forced: this config's runs answered and its pair judged again, all written anew; greedy answers come out
        # alike, so the judge's cache replies; the other judge model's pair stays as it is
        other_pair = base.at(other["units"]["gsnr_0.5_vs_random_0.5"])
        other_outcomes = other_pair.read_text()
        forced = pipeline.run_stage("evaluation", cfg, base, force=True, **QUIET)
        assert sorted(forced["generated"]) == ["gsnr_0.5", "random_0.5"]
        assert forced["judged"] == ["gsnr_0.5_vs_random_0.5"] and forced["units"] == counts["units"]
        assert judge.calls == 2 * first_calls and pair.read_text() == outcomes
        assert other_pair.read_text() == other_outcomes
        for run, folder in folders.items():
            now, before = files_of(folder), answers[run]
            assert {name: sha for name, (sha, _) in now.items()} == {name: sha for name, (sha, _) in before.items()}
            assert all(now[name][1] != before[name][1] for name in now)  # written anew
    finally:
        judge.close()
    assert sorted(counts["generated"]) == ["gsnr_0.5", "random_0.5"] and counts["judged"] == ["gsnr_0.5_vs_random_0.5"]
    assert counts["prompts"] == 6 and counts["heldout_examples"] == 10 and counts["judge"] == "ran"
    assert first_calls == 2 * 6  # one pair (gsnr vs random) per prompt, both answer orders
    # each run's folder is keyed by its subset's key (its model) and the generation settings
    for run, folder in folders.items():
        assert folder.name == f"{run}-{run_key(cfg, finetune_subset_key(finetune_counts, run), 'hf')}"
    assert base.references("evaluation", counts["key"]) == set(counts["units"].values())
    assert sorted((ev / "judge").children()) == sorted(
        [base.at(pair_path(counts)).name, base.at(other["units"]["gsnr_0.5_vs_random_0.5"]).name]
    )

    gens = {}
    for run, folder in folders.items():
        rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(isinstance(r["answer"], str) for r in rows)
        gens[run] = {(r["test_set"], r["id"]): r for r in rows}
        heldout = json.loads((folder / "heldout.json").read_text())
        assert heldout["examples"] == 10 and heldout["tokens"] > 0 and 0 < heldout["loss"] < 20
        assert (folder / "_done").read_text() == folder.name.rsplit("-", 1)[1]

    # Expected outcomes, computed here from the answers and the judge's scripted rule.
    expected = []
    for key, ours in sorted(gens["gsnr_0.5"].items()):
        theirs = gens["random_0.5"][key]["answer"]
        if ours["instruction"] == garbled:
            expected.append("invalid")
        else:
            a, b = len(ours["answer"]), len(theirs)
            expected.append("win" if a > b else "lose" if a < b else "tie")
    assert sorted(json.loads(line)["outcome"] for line in outcomes.splitlines()) == sorted(expected)
    want = pws.summarise(expected)
    table = {r["run"]: r for r in csv.DictReader(io.StringIO((ev / "compare.csv").read_text()))}
    assert set(table) == {"gsnr_0.5", "random_0.5"}
    row = table["gsnr_0.5"]
    assert row["judged_against"] == "random_0.5" and int(row["n_train"]) > 0
    assert float(row["pws_all"]) == pytest.approx(want["pws"], abs=1e-4)
    assert float(row["heldout_loss"]) == pytest.approx(
        json.loads((folders["gsnr_0.5"] / "heldout.json").read_text())["loss"], abs=1e-4
    )
    assert table["random_0.5"]["pws_all"] == ""  # the reference is not judged against itself
    judged = json.loads((ev / "judge.json").read_text())["runs"]["gsnr_0.5"]["overall"]
    assert judged["invalid"] == 1
    assert "| gsnr_0.5 |" in (ev / "compare.md").read_text()
    for png in ("train_loss.png", "heldout_loss.png"):
        assert len((ev / png).read_bytes()) > 1000


def pair_path(counts: dict) -> str:
    return counts["units"]["gsnr_0.5_vs_random_0.5"]


def finetune_subset_key(finetune_counts: dict, run: str) -> str:
    return finetune_counts["units"][run].rsplit("-", 1)[1]
