"""One run directory through `gradfilter-ray run` (in this process, on the session's Ray) under one config after
another, then `gradfilter-ray gc`: a config change pays for exactly the units it changes.

The run directory starts as a copy of the suite's finished tiny CLI run (conftest's `reference_run`: data to report,
then `gradfilter-ray audit`). Config A is that run's config (tests/cli_runs.py: the tiny GPT-2 config with
`TINY_RUN`) that also fine-tunes gsnr and random at one ratio (the bundled tiny LLaMA target) and judges them over
real HTTP: its first run finds every stage up to the report done and runs fine-tuning and evaluation only. B adds a
ratio; then A again, A with how the judge is waited for changed, A with another judge model, A with a scorer
dropped, A again, `gc` dry for A and B, `gc --config A`, A once more, and the `report` verb plain and forced.

What each run did is read off the run directory, not off the stages' own counts: subsets trained are the `_done`
markers (and training summaries) written during the run, checked against the fine-tuning workers started (a wrapper
around the real worker loop counts them), answers generated the lines of the answer files written during it, judge
calls the requests the judge server received; a unit left alone keeps every byte and mtime."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cli_runs import TINY, TINY_RUN, tiny_cfg
from conftest import ChatServer, reply

from gradfilter_ray import cli, gc, pipeline, runtime
from gradfilter_ray.config import load, parse_override
from gradfilter_ray.finetune import stage as finetune_stage
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.scorers import SCORERS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PROMPTS = 2
A_RUNS = ("gsnr_0.25", "random_0.25")
B_ONLY_RUNS = ("gsnr_0.5", "random_0.5")
UPSTREAM = ("data", "tokens", "ensemble", "gradients", "scoring")
REFERENCE_DONE = (*UPSTREAM, "selection", "report")  # the reference run's stages: done before A's first run
# On top of the reference run's config (16 rows, selections at 0.25 and 0.5: subsets of 4 and 8 rows): the bundled
# tiny LLaMA trained one epoch by one worker (one step of 8 rows; 256 tokens leave every selected row response
# tokens); two vicuna prompts, a few new tokens and four held-out answers.
SCENARIO = {
    "finetune": {
        "model": {"name_or_path": "bundled:stories260K"},
        "max_length": 256,
        "method": "full",
        "zero_stage": 2,
        "learning_rate": 0.003,
        "epochs": 1,
        "effective_batch_size": 8,
        "micro_batch_size": 8,
        "num_workers": 1,
        "cpus_per_worker": 1,
        "gpus_per_worker": 0,
        "gradient_checkpointing": False,
        "scorers": ["gsnr", "random"],
        "ratios": [0.25],
    },
    "evaluation": {
        "test_sets": ["vicuna"],
        "max_prompts_per_set": PROMPTS,
        "max_new_tokens": 6,
        "heldout_limit": 4,
        "engine": "hf",
        "cpus_per_actor": 1,
        "gpus_per_actor": 0,
        "judge": {"model": "judge-1", "reference": "random", "concurrency": 2},
    },
}
JUDGE_WAIT = ("evaluation.judge.timeout_s=7", "evaluation.judge.concurrency=3")
OTHER_JUDGE = ("evaluation.judge.model=judge-2",)
NO_LENGTH = (f"scoring.scorers=[{', '.join(s for s in SCORERS if s != 'length')}]",)
ANSWERS = "generations.jsonl"
UNIT = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{16})")


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def overrides_tree(overrides: tuple[str, ...]) -> dict:
    """`--set` overrides ("section.field=value", the value parsed as YAML) as a nested mapping."""
    tree: dict = {}
    for override in overrides:
        dotted, value = parse_override(override)
        *sections, name = dotted.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return tree


def write_config(path: Path, output_dir: Path, judge_url: str, finetune_ratios: list[float]) -> Path:
    """The reference run's config (the tiny config with `TINY_RUN`), the scenario's fine-tuning and evaluation on
    top, fine-tuned at `finetune_ratios`."""
    reference = merged(yaml.safe_load(TINY.read_text()), overrides_tree(TINY_RUN))
    extra = merged(
        SCENARIO, {"finetune": {"ratios": finetune_ratios}, "evaluation": {"judge": {"base_url": judge_url}}}
    )
    path.write_text(yaml.safe_dump(merged(reference, {**extra, "output_dir": str(output_dir)}), sort_keys=False))
    return path


Files = dict[str, tuple[int, int, str]]  # path relative to the run directory -> (size, mtime_ns, sha256)


def files_under(root: Path) -> Files:
    return {
        str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def is_unit_file(path: str) -> bool:
    """A file of a unit's output (a member, a shard, a subset, an evaluated run, a judged pair) or the judge cache."""
    parts = path.split("/")
    units = parts[0] in ("ensemble", "finetune") and len(parts) > 2 and UNIT.fullmatch(parts[1])
    return bool(units) or parts[0] == "gradients" or parts[:2] in (["evaluation", "runs"], ["evaluation", "judge"])


@dataclass
class Step:
    """One command on the run directory: the files and the manifest's stage records before and after it, the
    judge requests it made, the fine-tuning workers it started and what it printed."""

    code: int
    before: Files
    after: Files
    records_before: dict
    records_after: dict
    requests: list[dict]
    answers: dict[str, str]  # every answer file after the step: path -> its text
    out: str = ""
    seconds: float = 0.0
    references_before: dict = field(default_factory=dict)  # the manifest's references before the step
    fits: list[str] = field(default_factory=list)  # subsets whose fine-tuning worker loop started, by name
    finetune_view: dict = field(default_factory=dict)  # finetune/summary.json after the step
    ray_sessions: int = 0  # times the CLI opened its Ray session (runtime.ray_session) during the step

    @property
    def new(self) -> set[str]:
        return set(self.after) - set(self.before)

    @property
    def written(self) -> set[str]:
        """Files created or written again (same bytes or not) during the step."""
        return self.new | {p for p in set(self.before) & set(self.after) if self.before[p] != self.after[p]}

    @property
    def gone(self) -> set[str]:
        return set(self.before) - set(self.after)

    def trained(self) -> list[str]:
        """Subsets whose `_done` marker or training summary was written during the step (a fit() ran), by name."""
        folders = {
            p.split("/")[1] for p in self.written if re.fullmatch(r"finetune/[^/]+/(_done|train_summary.json)", p)
        }
        return sorted(UNIT.fullmatch(f).group("name") for f in folders)

    def answered(self) -> dict[str, int]:
        """Answers generated during the step, by evaluated run: the lines of answer files written in it."""
        written = {p: text for p, text in self.answers.items() if p in self.written}
        return {UNIT.fullmatch(p.split("/")[2]).group("name"): len(text.splitlines()) for p, text in written.items()}

    def units_unchanged(self) -> bool:
        kept = {p: v for p, v in self.before.items() if is_unit_file(p)}
        return all(self.after.get(p) == v for p, v in kept.items())


def fits_counted(fits: Path):
    """The real fine-tuning worker loop, which first appends its subset's name to `fits` (rank 0 only)."""

    def counting_worker(config: dict) -> None:
        import ray.train

        from gradfilter_ray.finetune.worker import finetune_worker

        if ray.train.get_context().get_world_rank() == 0:
            with open(fits, "a") as fh:
                fh.write(config["name"] + "\n")
        finetune_worker(config)

    return counting_worker


def sessions_counted(ray_session, opened: list):
    """The real `runtime.ray_session`, which first appends to `opened`."""

    @contextlib.contextmanager
    def counting_session(cfg):
        opened.append(cfg)
        with ray_session(cfg):
            yield

    return counting_session


class Scenario:
    def __init__(self, root: Path, judge: ChatServer, fits: Path, sessions: list) -> None:
        self.root = root
        self.run = RunDir(str(root))
        self.judge = judge
        self.fits = fits  # what `fits_counted` appends to
        self.sessions = sessions  # what `sessions_counted` appends to

    def fits_so_far(self) -> list[str]:
        return self.fits.read_text().splitlines() if self.fits.exists() else []

    def records(self, part: str = "stages") -> dict:
        manifest = self.run.root / "manifest.json"
        return copy.deepcopy(json.loads(manifest.read_text()).get(part, {})) if manifest.exists() else {}

    def step(self, argv: list[str]) -> Step:
        before, records, references, calls, fits = (
            files_under(self.root) if self.root.exists() else {},
            self.records(),
            self.records("references"),
            len(self.judge.requests),
            len(self.fits_so_far()),
        )
        sessions = len(self.sessions)
        out = io.StringIO()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out):
                code = cli.main(argv)
        except BaseException:
            print(out.getvalue())
            raise
        seconds = time.perf_counter() - started
        view = self.root / "finetune" / "summary.json"
        return Step(
            code,
            before,
            files_under(self.root),
            records,
            self.records(),
            self.judge.requests[calls:],
            {str(p.relative_to(self.root)): p.read_text() for p in self.root.glob(f"evaluation/runs/*/{ANSWERS}")},
            out.getvalue(),
            seconds,
            references,
            self.fits_so_far()[fits:],
            json.loads(view.read_text()) if view.exists() else {},
            len(self.sessions) - sessions,
        )

    def gfr(self, config: Path, *overrides: str) -> Step:
        return self.step(["run", "--config", str(config), *(a for o in overrides for a in ("--set", o))])


def judge_server() -> ChatServer:
    server = ChatServer(lambda body: reply("7 3\nthe first answers better"))
    server.url += "/v1"
    return server


@contextlib.contextmanager
def session_kept():
    """The CLI sets up its process for its run (environment defaults, the Ray Data context): put both back for the
    session's other tests."""
    import ray.data

    env = dict(os.environ)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.use_datasource_v2)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.use_datasource_v2 = saved
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update({name: value for name, value in env.items() if os.environ.get(name) != value})


@pytest.fixture(scope="module")
def scenario(ray_cluster, reference_run, tmp_path_factory):
    """On a copy of the reference run: A, B, A, A (judge waits), A (judge model), A (no length scorer), gc A and B
    dry, gc A, A, report, report --force: every step's facts. Every fine-tuning runs the real worker loop through
    `fits_counted`."""
    assert reference_run["rc"] == 0, reference_run["log"][-4000:]
    assert reference_run["audit_rc"] == 0, reference_run["audit_log"][-4000:]
    base = tmp_path_factory.mktemp("rerun")
    root = base / "run"
    shutil.copytree(reference_run["out"], root)  # the reference run itself is only read
    judge = judge_server()
    config_a = write_config(base / "a.yaml", root, judge.url, [0.25])
    config_b = write_config(base / "b.yaml", root, judge.url, [0.25, 0.5])
    fits = base / "fits.txt"
    counted = functools.partial(finetune_stage.run, train_fn=fits_counted(fits))
    sessions: list = []
    steps: dict[str, Step] = {}
    try:
        with session_kept(), pytest.MonkeyPatch.context() as patch:
            patch.setitem(pipeline.STAGES, "finetune", dataclasses.replace(pipeline.STAGES["finetune"], run=counted))
            patch.setattr(runtime, "ray_session", sessions_counted(runtime.ray_session, sessions))
            s = Scenario(root, judge, fits, sessions)
            steps["a"] = s.gfr(config_a)
            steps["b"] = s.gfr(config_b)
            steps["a_again"] = s.gfr(config_a)
            steps["judge_wait"] = s.gfr(config_a, *JUDGE_WAIT)
            steps["judge_model"] = s.gfr(config_a, *OTHER_JUDGE)
            steps["no_length"] = s.gfr(config_a, *NO_LENGTH)
            steps["a_restored"] = s.gfr(config_a)
            steps["gc_dry_ab"] = s.step(["gc", "-c", str(config_a), "-c", str(config_b), "--dry-run"])
            steps["gc_a"] = s.step(["gc", "--config", str(config_a)])
            steps["a_after_gc"] = s.gfr(config_a)
            steps["report_done"] = s.step(["report", "--config", str(config_a)])
            steps["report_forced"] = s.step(["report", "--config", str(config_a), "--force"])
    finally:
        judge.close()
    print("seconds by step:", {name: round(step.seconds, 1) for name, step in steps.items()})
    return {
        "steps": steps,
        "run": RunDir(str(root)),
        "root": root,
        "config_a": load(config_a),
        "reference": tiny_cfg(reference_run["out"]),
    }


def answers_of(text: str) -> dict[str, str]:
    """An answer file's answers by question."""
    rows = [json.loads(line) for line in text.splitlines()]
    return {r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""): r["answer"] for r in rows}


def asked(request: dict) -> tuple[str, str, str]:
    """What a judge request asks about: (question, assistant 1's answer, assistant 2's answer)."""
    prompt = request["body"]["messages"][-1]["content"]
    found = re.search(
        r"\[Question\]\n(.*?)\n\n\[The Start of Assistant 1's Answer\]\n(.*?)\n\n\[The End of Assistant 1's Answer\]"
        r"\n\n\[The Start of Assistant 2's Answer\]\n(.*?)\n\n\[The End of Assistant 2's Answer\]",
        prompt,
        re.S,
    )
    return found.group(1), found.group(2), found.group(3)


def both_orders(step: Step, pair: tuple[str, str]) -> list[tuple[str, str, str]]:
    """The judge requests a pair of runs makes: each question with the two runs' answers, in both orders."""
    ours, theirs = (answers_of(step.answers[f"{units_of(step, 'evaluation')[run]}/{ANSWERS}"]) for run in pair)
    return sorted((q, x, y) for q in ours for x, y in ((ours[q], theirs[q]), (theirs[q], ours[q])))


def units_of(step: Step, stage: str) -> dict[str, str]:
    return step.records_after[stage]["units"]


def test_a_keys_the_reference_runs_stages_and_audit_as_the_reference_config_did(scenario):
    a_cfg, reference = scenario["config_a"], scenario["reference"]
    assert {s: pipeline.stage_key(s, a_cfg) for s in (*REFERENCE_DONE, "audit")} == {
        s: pipeline.stage_key(s, reference) for s in (*REFERENCE_DONE, "audit")
    }
    audit_keys = gc.stage_keys(a_cfg)[gc.AUDIT]
    assert audit_keys == gc.stage_keys(reference)[gc.AUDIT]
    # after the whole scenario (gc included), the copied audit is still done under those keys
    run = scenario["run"]
    assert run.stage_done("audit", pipeline.stage_key("audit", a_cfg))
    assert all(run.subdir(gc.AUDIT).stage_done(stage, key) for stage, key in audit_keys.items())


def test_a_reuses_the_reference_run_and_trains_evaluates_and_judges_its_own_units(scenario):
    a = scenario["steps"]["a"]
    assert a.code == 0, a.out[-4000:]
    for stage in REFERENCE_DONE:  # the CLI run's outputs, found done: records and files as it left them
        assert f"[{stage}] already done (key {a.records_before[stage]['key']})" in a.out, stage
        assert a.records_after[stage] == a.records_before[stage], stage
    assert not {p for p in a.written if p.split("/")[0] in (*REFERENCE_DONE, "audit", "rejects.parquet")}
    assert {a.records_after[s]["status"] for s in ("finetune", "evaluation")} == {"done"}
    assert a.trained() == sorted(A_RUNS) and sorted(a.fits) == sorted(A_RUNS)
    assert sorted(a.finetune_view["runs"]) == sorted(A_RUNS) and a.finetune_view["skipped"] == {}
    # every selected subset trained on rows with response tokens at finetune.max_length
    assert all(run["train"]["rows_trained"] > 0 for run in a.finetune_view["runs"].values())
    assert a.answered() == dict.fromkeys(A_RUNS, PROMPTS)
    # one pair (gsnr against random): both answer orders per prompt
    assert sorted(map(asked, a.requests)) == both_orders(a, A_RUNS) and len(a.requests) == 2 * PROMPTS
    assert {r["body"]["model"] for r in a.requests} == {"judge-1"}
    pairs = [p for p in a.new if p.startswith("evaluation/judge/")]
    assert len(pairs) == 1 and Path(pairs[0]).name.startswith("gsnr_0.25_vs_random_0.25-")


def test_b_trains_evaluates_and_judges_only_the_added_ratio(scenario):
    a, b = scenario["steps"]["a"], scenario["steps"]["b"]
    assert b.code == 0, b.out[-4000:]
    for stage in REFERENCE_DONE:  # already done: their records as A left them
        assert b.records_after[stage] == a.records_after[stage], stage
    assert b.trained() == sorted(B_ONLY_RUNS) and sorted(b.fits) == sorted(B_ONLY_RUNS)
    assert b.answered() == dict.fromkeys(B_ONLY_RUNS, PROMPTS)
    assert b.units_unchanged()  # A's subsets, answers and pair: every byte and mtime
    new_units = {p.split("/")[1] for p in b.new if p.startswith("finetune/") and p.count("/") > 1}
    assert sorted(UNIT.fullmatch(u).group("name") for u in new_units) == sorted(B_ONLY_RUNS)
    # the stage's own counts say the same: A's subsets reused from their folders, the new ones finished under the
    # keys its view gives them (their `_done` markers hold them)
    finetune, a_units = b.records_after["finetune"], units_of(a, "finetune")
    assert sorted(finetune["trained"]) == sorted(B_ONLY_RUNS) and sorted(finetune["reused"]) == sorted(A_RUNS)
    assert {run: finetune["units"][run] for run in A_RUNS} == a_units and finetune["skipped"] == {}
    assert sorted(finetune["steps"]) == sorted(b.finetune_view["runs"]) == sorted((*A_RUNS, *B_ONLY_RUNS))
    for run in B_ONLY_RUNS:
        key = b.finetune_view["runs"][run]["key"]
        assert finetune["units"][run] == f"finetune/{run}-{key}"
        assert b.after[f"finetune/{run}-{key}/_done"][2] == hashlib.sha256(key.encode()).hexdigest()
    # the judge was asked about the new pair only: both orders of each prompt, with the new runs' answers
    assert sorted(map(asked, b.requests)) == both_orders(b, B_ONLY_RUNS) and len(b.requests) == 2 * PROMPTS
    assert [Path(p).name.split("-")[0] for p in b.new if p.startswith("evaluation/judge/")] == [
        "gsnr_0.5_vs_random_0.5"
    ]


def test_a_again_trains_generates_and_judges_nothing(scenario):
    steps = scenario["steps"]
    for name in ("a_again", "a_restored", "a_after_gc"):
        step = steps[name]
        assert step.code == 0, name
        assert step.trained() == [] and step.fits == [] and step.answered() == {} and step.requests == [], name
        assert step.units_unchanged() and not step.gone, name
    assert steps["a_again"].new == set()
    # back from B, the finetune stage runs again (its key changed twice) and maps A's subsets as A's run did; B's
    # subsets stay (not gone, above), outside A's view
    again, a = steps["a_again"], steps["a"]
    assert "[finetune] running" in again.out
    assert again.records_after["finetune"]["key"] == a.records_after["finetune"]["key"]
    assert again.records_after["finetune"]["units"] == units_of(a, "finetune")
    assert again.records_after["finetune"]["trained"] == [] and again.finetune_view == a.finetune_view
    # back from the config without the length scorer: its selections are written again, nothing else is new
    assert {Path(p).stem for p in steps["a_restored"].new} == {"length_0.25", "length_0.5"}
    assert all(p.startswith("selection/") for p in steps["a_restored"].new)
    after_gc = steps["a_after_gc"]  # A's records were A's already: every stage is skipped
    assert after_gc.records_after == after_gc.records_before and after_gc.written <= {"manifest.json"}
    # a stage to run opens the Ray session; with none, no Ray is started or joined
    assert [steps[name].ray_sessions for name in ("a_again", "a_restored", "a_after_gc")] == [1, 1, 0]


def test_a_stage_verb_opens_the_ray_session_only_with_work_to_do(scenario):
    done, forced = scenario["steps"]["report_done"], scenario["steps"]["report_forced"]
    assert done.code == forced.code == 0
    assert "[report] already done" in done.out and done.ray_sessions == 0 and not done.written - {"manifest.json"}
    assert "[report] running" in forced.out and forced.ray_sessions == 1
    assert any(p.startswith("report/") for p in forced.written)


def test_every_step_started_the_fine_tuning_workers_of_exactly_the_subsets_it_trained(scenario):
    for name, step in scenario["steps"].items():
        assert sorted(step.fits) == step.trained(), name
    assert sum(len(step.fits) for step in scenario["steps"].values()) == len(A_RUNS) + len(B_ONLY_RUNS)


def test_an_empty_selection_is_skipped_and_the_others_keep_the_subset_keys_a_trained(scenario, tmp_path):
    """A's selections as a run directory of their own, random's emptied: no subset for it ("empty selection", which
    the stage records and shows in its view), and gsnr's subset is the one A trained."""
    (tmp_path / "selection").mkdir()
    selected = scenario["root"] / "selection"
    shutil.copy(selected / "gsnr_0.25.parquet", tmp_path / "selection")
    random_rows = pq.read_table(selected / "random_0.25.parquet")
    assert random_rows.num_rows > 0
    pq.write_table(random_rows.slice(0, 0), tmp_path / "selection" / "random_0.25.parquet")
    subsets, skipped = finetune_stage.plan_subsets(scenario["config_a"], RunDir(str(tmp_path)))
    assert skipped == {"random_0.25": "empty selection"}
    a_units = units_of(scenario["steps"]["a"], "finetune")
    assert [f"finetune/{s.folder}" for s in subsets] == [a_units["gsnr_0.25"]]


def test_how_the_judge_is_waited_for_redoes_nothing(scenario):
    step = scenario["steps"]["judge_wait"]
    assert step.code == 0
    assert step.records_after == step.records_before  # every stage already done
    assert step.requests == [] and step.new == set() and step.written <= {"manifest.json"}
    assert step.ray_sessions == 0


def test_another_judge_model_pays_for_verdicts_only(scenario):
    step = scenario["steps"]["judge_model"]
    assert step.code == 0
    for stage in (*UPSTREAM, "selection", "report", "finetune"):
        assert step.records_after[stage] == step.records_before[stage], stage
    assert step.records_after["evaluation"]["key"] != step.records_before["evaluation"]["key"]
    assert step.trained() == [] and step.answered() == {} and step.units_unchanged()
    assert sorted(map(asked, step.requests)) == both_orders(step, A_RUNS) and len(step.requests) == 2 * PROMPTS
    assert {r["body"]["model"] for r in step.requests} == {"judge-2"}
    pairs = [Path(p).name for p in step.new if p.startswith("evaluation/judge/")]
    assert len(pairs) == 1 and pairs[0].startswith("gsnr_0.25_vs_random_0.25-")


def test_a_scorer_dropped_reselects_without_gradient_or_scoring_work(scenario):
    step = scenario["steps"]["no_length"]
    assert step.code == 0
    for stage in UPSTREAM:
        assert step.records_after[stage] == step.records_before[stage], stage
    assert not {p for p in step.written if p.startswith(("gradients/", "ensemble/", "scoring/", "tokens/", "data/"))}
    assert step.records_after["selection"]["key"] != step.records_before["selection"]["key"]
    assert {Path(p).stem for p in step.gone} == {"length_0.25", "length_0.5"}  # the dropped scorer's selections
    assert all(p.startswith("selection/") for p in step.gone)
    assert step.trained() == [] and step.answered() == {} and step.requests == [] and step.units_unchanged()


def unit_names(paths) -> list[tuple[str, str]]:
    """Each unit output's folder and readable name: 'finetune/gsnr_0.5-<key>' -> ('finetune', 'gsnr_0.5')."""
    found = [(str(Path(p).parent), UNIT.fullmatch(Path(p).name.removesuffix(".jsonl"))) for p in paths]
    return sorted((folder, m.group("name")) for folder, m in found)


def gc_paths(out: str) -> list[str]:
    lines = out.strip().splitlines()
    return [] if lines[0].startswith("nothing to remove") else [line.split()[-1] for line in lines[:-1]]


def audit_outputs(files: Files) -> Files:
    """The audit's files (its run directory, `audit/`) but its manifest."""
    return {p: v for p, v in files.items() if p.startswith("audit/") and p != "audit/manifest.json"}


def test_gc_keeps_every_kept_configs_unit_and_removes_exactly_the_rest(scenario):
    steps = scenario["steps"]
    a, b, other_judge = steps["a_restored"], steps["b"], steps["judge_model"]
    a_units = {*units_of(a, "finetune").values(), *units_of(a, "evaluation").values()}
    b_units = {*units_of(b, "finetune").values(), *units_of(b, "evaluation").values()}
    other_pair = units_of(other_judge, "evaluation")["gsnr_0.25_vs_random_0.25"]
    assert other_pair not in a_units | b_units

    dry = steps["gc_dry_ab"]
    assert dry.code == 0 and dry.written == set() and dry.gone == set()
    assert gc_paths(dry.out) == [other_pair]  # only the other judge model's pair: no config kept here uses it

    gc_a = steps["gc_a"]
    assert gc_a.code == 0
    b_only = b_units - a_units  # the two subsets, their evaluated runs, their pair
    assert unit_names(b_only) == [
        ("evaluation/judge", "gsnr_0.5_vs_random_0.5"),
        ("evaluation/runs", "gsnr_0.5"),
        ("evaluation/runs", "random_0.5"),
        ("finetune", "gsnr_0.5"),
        ("finetune", "random_0.5"),
    ]
    removed = sorted(b_only | {other_pair})
    assert gc_paths(gc_a.out) == removed
    assert gc_a.gone == {p for p in gc_a.before if any(p.startswith(r + "/") or p == r for r in removed)}
    freed = sum(gc_a.before[p][0] for p in gc_a.gone)
    assert f"({freed} of " in gc_a.out.strip().splitlines()[-1] and f"{len(removed)} paths)" in gc_a.out
    # A's outputs intact; the manifests (the run's and the audit's) drop the recorded paths that no longer exist
    # (a finished ensemble's Ray Train state, for one)
    assert gc_a.written <= {"manifest.json", "audit/manifest.json"}
    # the reference run's audit, which A and B key alike: every file kept, bytes and mtimes (its stage records
    # stay done: test_a_keys_the_reference_runs_stages_and_audit_as_the_reference_config_did)
    audit = audit_outputs(steps["a"].before)
    assert audit and audit_outputs(steps["a_after_gc"].after) == audit
    assert all(scenario["run"].at(p).exists() for p in a_units)
    # A ran last: its records reference nothing removed and stay done. B's records, had B run last, would now say
    # "collected" (not done), so B's next run redoes its finetune and evaluation stages, not skips them.
    assert gc_a.records_after == gc_a.records_before
    b_records = {"stages": {s: b.records_after[s] for s in ("finetune", "evaluation")}}
    collected = gc.collected_records({**b_records, "references": gc_a.references_before}, removed)
    assert {s: r["status"] for s, r in collected.items()} == {"finetune": "collected", "evaluation": "collected"}
