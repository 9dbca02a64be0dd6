"""One run directory through `gradfilter-ray run` (in this process, on the session's Ray) under one config after
another, then `gradfilter-ray gc`: a config change pays for exactly the units it changes.

Config A fine-tunes gsnr and random at one ratio (the tiny GPT-2 proxy, the bundled tiny LLaMA target) and judges
them over real HTTP; B adds a ratio; then A again, A with how the judge is waited for changed, A with another judge
model, A with a scorer dropped, A again, `gc` dry for A and B, `gc --config A`, and A once more.

What each run did is read off the run directory, not off the stages' own counts: subsets trained are the `_done`
markers (and training summaries) written during the run, answers generated the lines of the answer files written
during it, judge calls the requests the judge server received; a unit left alone keeps every byte and mtime."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ChatServer, reply

from gradfilter_ray import cli
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.scorers import SCORERS

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny_gpt2.yaml"
PROMPTS = 2
A_RUNS = ("gsnr_0.25", "random_0.25")
B_ONLY_RUNS = ("gsnr_0.5", "random_0.5")
UPSTREAM = ("data", "tokens", "ensemble", "gradients", "scoring")
# The tiny GPT-2 proxy on 24 rows; the bundled tiny LLaMA trained one epoch by one worker (one or two steps of 8
# rows); two vicuna prompts, a few new tokens and four held-out answers.
OVERRIDES = {
    "data": {"limit": 24},
    "ensemble": {"members": 2},
    "gradients": {"shard_rows": 24},
    "selection": {"ratios": [0.25, 0.5]},
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
    "ray": {"progress_bars": False},
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


def write_config(path: Path, output_dir: Path, judge_url: str, finetune_ratios: list[float]) -> Path:
    tiny = yaml.safe_load(TINY.read_text())
    extra = merged(
        OVERRIDES, {"finetune": {"ratios": finetune_ratios}, "evaluation": {"judge": {"base_url": judge_url}}}
    )
    path.write_text(yaml.safe_dump(merged(tiny, {**extra, "output_dir": str(output_dir)}), sort_keys=False))
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
    """One command on the run directory: the files and the manifest's stage records before and after it, and the
    judge requests it made."""

    code: int
    before: Files
    after: Files
    records_before: dict
    records_after: dict
    requests: list[dict]
    answers: dict[str, str]  # every answer file after the step: path -> its text
    out: str = ""
    seconds: float = 0.0

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


class Scenario:
    def __init__(self, root: Path, judge: ChatServer) -> None:
        self.root = root
        self.run = RunDir(str(root))
        self.judge = judge

    def records(self) -> dict:
        manifest = self.run.root / "manifest.json"
        return copy.deepcopy(json.loads(manifest.read_text()).get("stages", {})) if manifest.exists() else {}

    def step(self, argv: list[str], quiet: bool = False) -> Step:
        before, records, calls = (
            files_under(self.root) if self.root.exists() else {},
            self.records(),
            len(self.judge.requests),
        )
        out = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            code = cli.main(argv)
        seconds = time.perf_counter() - started
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
def scenario(ray_cluster, tmp_path_factory):
    """A, B, A, A (judge waits), A (judge model), A (no length scorer), gc A and B dry, gc A, A: every step's facts."""
    base = tmp_path_factory.mktemp("rerun")
    root = base / "run"
    judge = judge_server()
    config_a = write_config(base / "a.yaml", root, judge.url, [0.25])
    config_b = write_config(base / "b.yaml", root, judge.url, [0.25, 0.5])
    steps: dict[str, Step] = {}
    try:
        with session_kept():
            s = Scenario(root, judge)
            steps["a"] = s.gfr(config_a)
            steps["b"] = s.gfr(config_b)
            steps["a_again"] = s.gfr(config_a)
            steps["judge_wait"] = s.gfr(config_a, *JUDGE_WAIT)
            steps["judge_model"] = s.gfr(config_a, *OTHER_JUDGE)
            steps["no_length"] = s.gfr(config_a, *NO_LENGTH)
            steps["a_restored"] = s.gfr(config_a)
            steps["gc_dry_ab"] = s.step(["gc", "-c", str(config_a), "-c", str(config_b), "--dry-run"], quiet=True)
            steps["gc_a"] = s.step(["gc", "--config", str(config_a)], quiet=True)
            steps["a_after_gc"] = s.gfr(config_a)
    finally:
        judge.close()
    print("seconds by step:", {name: round(step.seconds, 1) for name, step in steps.items()})
    return {"steps": steps, "run": RunDir(str(root))}


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


def test_a_runs_every_stage_and_trains_evaluates_and_judges_its_own_units(scenario):
    a = scenario["steps"]["a"]
    assert a.code == 0
    assert all(
        a.records_after[s]["status"] == "done" for s in (*UPSTREAM, "selection", "report", "finetune", "evaluation")
    )
    assert a.trained() == sorted(A_RUNS)
    assert a.answered() == dict.fromkeys(A_RUNS, PROMPTS)
    # one pair (gsnr against random): both answer orders per prompt
    assert sorted(map(asked, a.requests)) == both_orders(a, A_RUNS) and len(a.requests) == 2 * PROMPTS
    assert {r["body"]["model"] for r in a.requests} == {"judge-1"}
    pairs = [p for p in a.new if p.startswith("evaluation/judge/")]
    assert len(pairs) == 1 and Path(pairs[0]).name.startswith("gsnr_0.25_vs_random_0.25-")


def test_b_trains_evaluates_and_judges_only_the_added_ratio(scenario):
    a, b = scenario["steps"]["a"], scenario["steps"]["b"]
    assert b.code == 0
    for stage in (*UPSTREAM, "selection", "report"):  # already done: their records as A left them
        assert b.records_after[stage] == a.records_after[stage], stage
    assert b.trained() == sorted(B_ONLY_RUNS)
    assert b.answered() == dict.fromkeys(B_ONLY_RUNS, PROMPTS)
    assert b.units_unchanged()  # A's subsets, answers and pair: every byte and mtime
    new_units = {p.split("/")[1] for p in b.new if p.startswith("finetune/") and p.count("/") > 1}
    assert sorted(UNIT.fullmatch(u).group("name") for u in new_units) == sorted(B_ONLY_RUNS)
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
        assert step.trained() == [] and step.answered() == {} and step.requests == [], name
        assert step.units_unchanged() and not step.gone, name
    assert steps["a_again"].new == set()
    # back from the config without the length scorer: its selections are written again, nothing else is new
    assert {Path(p).stem for p in steps["a_restored"].new} == {"length_0.25", "length_0.5"}
    assert all(p.startswith("selection/") for p in steps["a_restored"].new)
    after_gc = steps["a_after_gc"]  # A's records were A's already: every stage is skipped
    assert after_gc.records_after == after_gc.records_before and after_gc.written <= {"manifest.json"}


def test_how_the_judge_is_waited_for_redoes_nothing(scenario):
    step = scenario["steps"]["judge_wait"]
    assert step.code == 0
    assert step.records_after == step.records_before  # every stage already done
    assert step.requests == [] and step.new == set() and step.written <= {"manifest.json"}


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
    assert gc_a.written <= {"manifest.json"}  # A's outputs intact
    assert all(scenario["run"].at(p).exists() for p in a_units)
