"""Evaluation stage (Ray shell): every fine-tuned run's answers to the test prompts and its loss on the held-out
reference answers, all runs at once on actor pools as wide as the cluster allows; then, when a judge endpoint is
configured, pairwise judging of every run against the reference scorer's run at the same ratio; finally the
comparison table and plots (compare.py).

Units: an evaluated run and a judged pair each have a key of their own (keys.py; a run's carries the engine that
answers it), so a config change redoes exactly the units it changes. ``evaluation/runs/{run}-{key}/`` holds a run's
``generations.jsonl`` (test_set, id, instruction, input, answer), ``heldout.json`` and, written last, a ``_done``
marker holding its key: a run with it is not evaluated again (a new judge, or a subset added beside it, reuses it).
Each run's folder is written as soon as its wave is over, so a crash loses only the wave in flight.
``evaluation/judge/{run}_vs_{reference}-{key}.jsonl`` holds a judged pair's outcome per prompt, written once the judge
has replied to every prompt of the pair: a pair with that file is not judged again. The judge's cache lives at
``output_dir/.judge_cache.jsonl``, so a pair judged again (a request that failed, answers that changed) pays for no
reply twice. The comparison (``runs.json``, ``judge.json``, ``compare.csv`` / ``.md``, the plots) is this config's
view, rebuilt from the unit folders' small files every time the stage runs; every file is written on its own, and other
configs' units in ``evaluation/`` are never touched (`RunDir.add_references` records this config's, for `gc`). Forced
(``--force``), every run and pair of this config is removed and done again; the judge's cache is kept (a reply is paid
for once).

Concurrency: one Ray Data dataset (and actor pool) per run to evaluate, the runs of a wave consumed side by side
from driver threads (plan.py shares the actors out and cuts the waves). Not one dataset keyed by run: an actor holds
one model (a 7B model fills most of a GPU, loading another per batch would cost minutes) and Ray Data cannot route a
row to the actor that holds its run's model. The datasets are built in the driver's main thread, only their
streaming runs in the threads. With every run already evaluated, no Ray Data work starts.

Engines (plan.choose_engine): `hf` runs generation and held-out scoring in one pass of `hf_engine.ModelEvaluator`
actors; `vllm` generates through Ray Data's vLLM processor (vllm_engine.py) and then scores the held-out answers
with `hf` actors (a forward pass; vLLM is not used for it), wave by wave: a wave's runs are answered, then scored,
so the two never hold a GPU at once and a wave's runs are finished before the next wave starts. The models are read
by the actors; the driver writes the runs' answers and the view (small files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradfilter_ray.config import Config, EvaluationConfig
from gradfilter_ray.console import say
from gradfilter_ray.evaluation.hf_engine import (
    GENERATE,
    HELDOUT,
    POSITION,
    ModelEvaluator,
    hf_dataset,
    with_results,
)
from gradfilter_ray.evaluation.keys import pair_file, pair_key, run_key
from gradfilter_ray.evaluation.plan import choose_engine, cluster_width, plan_waves
from gradfilter_ray.resources import evaluation_actors
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import ALLOC_CONF, ALLOC_CONF_ENV, allocator_env
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location
from gradfilter_ray.units import DONE_MARKER, unit_finished, unit_name

JUDGE_CACHE = ".judge_cache.jsonl"
RUNS, PAIRS = "runs", "judge"  # under evaluation/: the evaluated runs' folders and the judged pairs' files
GENERATIONS, HELDOUT_FILE = "generations.jsonl", "heldout.json"


@dataclass(frozen=True)
class EvaluatedRun:
    """One fine-tuned run as the evaluation sees it: its name, the subset folder it was trained into, the rows it
    trained on, and its own key (`keys.run_key`)."""

    name: str
    subset: str  # its fine-tuned subset's folder, relative to the run directory (finetune/{name}-{subset key})
    n_train: int
    key: str

    @property
    def folder(self) -> str:
        """Its folder, relative to the run directory."""
        return f"evaluation/{RUNS}/{unit_name(self.name, self.key)}"


@dataclass(frozen=True)
class JudgedPair:
    """A run judged against its reference, under the pair's key (`keys.pair_key`)."""

    run: str
    reference: str
    key: str

    @property
    def name(self) -> str:
        return f"{self.run}_vs_{self.reference}"

    @property
    def file(self) -> str:
        """Its outcomes' file, relative to the run directory."""
        return f"evaluation/{PAIRS}/{pair_file(self.run, self.reference, self.key)}"


def evaluated_runs(cfg: Config, finetuned: dict[str, dict], engine: str) -> dict[str, EvaluatedRun]:
    """This config's runs (`finetuned`: the runs of finetune/summary.json, each with its folder and key), answered
    by `engine`."""
    return {
        name: EvaluatedRun(name, info["folder"], info["train"]["rows_trained"], run_key(cfg, info["key"], engine))
        for name, info in finetuned.items()
    }


def answering_engine(cfg: Config, models: dict[str, Location]) -> tuple[str, str]:
    """(engine, why) as `plan.choose_engine` picks them for these models, on the evaluation's actors, with vllm
    installed here or not."""
    from gradfilter_ray.evaluation.vllm_engine import vllm_installed

    local = all(m.is_local for m in models.values())
    return choose_engine(cfg.evaluation.engine, evaluation_actors(cfg).gpus, vllm_installed(), local)


def reference_of(name: str, reference_scorer: str, names) -> str | None:
    """The run `name` is judged against: the reference scorer's run at the same ratio (`full` against `full`, so
    never), or None when it is the reference itself or the reference was not fine-tuned."""
    selection = Selection.parse(name)
    reference = FULL if selection.scorer == FULL else Selection(reference_scorer, selection.ratio).name
    if selection.scorer == reference_scorer or reference not in names or reference == name:
        return None
    return reference


def evaluation_rows(ev: EvaluationConfig) -> list[dict]:
    from gradfilter_ray.evaluation.testsets import load_reference_answers, load_test_set

    rows = []
    for name in ev.test_sets:
        prompts = load_test_set(name)[: ev.max_prompts_per_set]
        set_name = Path(name).stem if name.endswith(".jsonl") else name
        rows += [{"kind": GENERATE, "test_set": set_name, "output": "", **p} for p in prompts]
    if ev.heldout:
        refs = load_reference_answers()[: ev.heldout_limit]
        rows += [{"kind": HELDOUT, "test_set": "alpaca_eval_805", **r} for r in refs]
    return rows


def sorted_table(rows: list[dict]) -> pa.Table:
    """Generation rows first, held-out rows after, each block sorted by prompt length (batches stay homogeneous),
    every row numbered with its position in that order."""
    rows = sorted(rows, key=lambda r: (r["kind"] != GENERATE, len(r["instruction"]) + len(r["input"])))
    table = pa.Table.from_pylist(rows)
    return table.append_column(POSITION, pa.array(range(len(rows)), pa.int64()))


def n_batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


def collect(ds) -> pa.Table:
    """Stream a dataset to the end (in a driver thread); its rows in position order."""
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    return table.sort_by(POSITION)


def run_waves(waves: list[dict[str, int]], build, finished) -> None:
    """Each wave's runs evaluated side by side: `build(run, actors)` makes a run's dataset (main thread), a thread
    per run streams it. A wave ends when all its runs have; then `finished(run, table)` takes each of its runs that
    streamed to the end, in the wave's order, and only after that does the wave's first failed run, in the same
    order (its dataset, its stream or its `finished` raised), stop the waves: a run that fails never costs its
    wave-mates their results."""
    for wave in waves:
        datasets, failures = {}, {}
        for run, actors in wave.items():
            try:
                datasets[run] = build(run, actors)
            except Exception as exc:  # noqa: BLE001 - raised below, once the wave's other runs are finished
                failures[run] = exc
        with ThreadPoolExecutor(max_workers=max(1, len(datasets)), thread_name_prefix="gfr-eval") as pool:
            futures = {run: pool.submit(collect, ds) for run, ds in datasets.items()}
        for run, future in futures.items():
            try:
                finished(run, future.result())
            except Exception as exc:  # noqa: BLE001 - as above
                failures[run] = exc
        if failures:
            raise failures[next(run for run in wave if run in failures)]


def evaluate_runs(
    cfg: Config,
    models: dict[str, Location],
    rows: list[dict],
    log=say,
    evaluator: type = ModelEvaluator,
    engine: tuple[str, str] | None = None,
    finished=None,
) -> dict[str, pa.Table]:
    """Every run's rows with their answers and held-out losses (one table per run, rows in sorted order).
    `engine`: (engine, why) as `answering_engine` gives them (None: chosen here). `finished(run, table)` takes each
    run as soon as its wave is over (before a failed run of that wave stops the evaluation)."""
    import ray

    ev = cfg.evaluation
    evaluators = evaluation_actors(cfg)
    table = sorted_table(rows)
    engine, why = engine or answering_engine(cfg, models)
    actors = evaluators.count or cluster_width(ray.cluster_resources(), evaluators.cpus, evaluators.gpus)
    log(f"[evaluation] engine {engine} ({why}); {len(models)} runs on up to {actors} actors")

    def hf_build(part: pa.Table):
        return lambda run, width: hf_dataset(
            part,
            models[run],
            ev,
            cfg.finetune.max_length,
            evaluators.with_count(width),
            evaluator,
            cfg.finetune.template,
        )

    def waves(part: pa.Table, phase: str) -> list[dict[str, int]]:
        planned = plan_waves({run: n_batches(part.num_rows, ev.batch_size) for run in models}, actors)
        if planned:
            log(f"[evaluation] {phase}: actors per run, by wave: " + " then ".join(json.dumps(w) for w in planned))
        return planned

    results: dict[str, pa.Table] = {}

    def done(run: str, result: pa.Table) -> None:
        if result.num_rows != table.num_rows or result[POSITION].to_pylist() != list(range(table.num_rows)):
            raise RuntimeError(f"evaluation of {run} returned {result.num_rows} rows for {table.num_rows} inputs")
        results[run] = result
        if finished is not None:
            finished(run, result)

    if engine == "hf":
        run_waves(waves(table, "answers and held-out losses (hf)"), hf_build(table), done)
        return results
    kinds = np.asarray(table["kind"].to_pylist())
    gen, ref = table.filter(pa.array(kinds == GENERATE)), table.filter(pa.array(kinds == HELDOUT))
    answer_then_score(
        waves(gen, "answers (vllm)") if gen.num_rows else [],
        waves(ref, "held-out losses (hf)") if ref.num_rows else [],
        lambda wave, answered: vllm_answers(cfg, models, gen, [wave], answered),
        lambda wave, scored: run_waves([wave], hf_build(ref), scored),
        lambda run, answers, scored: done(run, merge(gen, answers, scored)),
    )
    return results


def answer_then_score(
    answer_waves: list[dict[str, int]], score_waves: list[dict[str, int]], answer, score, finished
) -> None:
    """The vllm engine's two phases, wave by wave: a wave's runs answered (`answer(wave, answered)` calls
    `answered(run, answers)` per run), then the runs answered scored (`score(wave, scored)`, likewise with a
    table), then each run handed to `finished(run, answers, scored)` (None for a phase without rows, whose waves are
    []), all before the next wave starts. Both phases cut the runs into the same waves (`plan.plan_waves` groups
    them by the actors, in run order, whatever their batches). A run that fails in either phase stops the waves
    once its wave-mates are finished."""
    for index in range(max(len(answer_waves), len(score_waves))):
        answers: dict[str, list[str]] = {}

        def answered(run: str, answer_list: list[str], answers=answers) -> None:
            answers[run] = answer_list
            if not score_waves:
                finished(run, answer_list, None)

        def scored(run: str, table: pa.Table, answers=answers) -> None:
            finished(run, answers.get(run), table)

        failure = None
        if answer_waves:
            try:
                answer(answer_waves[index], answered)
            except Exception as exc:  # noqa: BLE001 - raised once the runs answered are scored and finished
                failure = exc
        if score_waves:
            wave = {run: width for run, width in score_waves[index].items() if not answer_waves or run in answers}
            try:
                if wave:
                    score(wave, scored)
            except Exception as exc:  # noqa: BLE001 - as above
                failure = failure or exc
        if failure is not None:
            raise failure


def vllm_answers(
    cfg: Config, models: dict[str, Location], gen: pa.Table, waves: list[dict[str, int]], finished
) -> None:
    """The answers of the waves' runs to the generation rows (in their order), through vLLM, each run's handed to
    `finished(run, answers)` as `run_waves` finishes it; the driver tokenizes and decodes with the run's own
    tokenizer (the same functions the HF path uses)."""
    from transformers import AutoTokenizer

    from gradfilter_ray.evaluation import vllm_engine
    from gradfilter_ray.evaluation.generate import Sampling, decode_answers, prompt_token_ids

    ev = cfg.evaluation
    evaluators = evaluation_actors(cfg)
    sampling = Sampling(
        ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_p, cfg.finetune.max_length, cfg.finetune.template
    )
    instructions, inputs = gen["instruction"].to_pylist(), gen["input"].to_pylist()
    tokenizers = {run: AutoTokenizer.from_pretrained(models[run].path) for wave in waves for run in wave}

    job_allocator = allocator_env()

    def build(run: str, width: int):
        model_config = json.loads((models[run] / "config.json").read_text())
        config = vllm_engine.processor_config(
            models[run].path,
            actors=width,
            batch_size=ev.batch_size,
            cpus_per_actor=evaluators.cpus,
            gpus_per_actor=evaluators.gpus,
            sampling=sampling,
            model_max_len=model_config.get("max_position_embeddings"),
            extra_engine_kwargs=ev.vllm_engine_kwargs,
            allocator_env=job_allocator if job_allocator == {ALLOC_CONF_ENV: ALLOC_CONF} else None,  # ours only
        )
        ids = prompt_token_ids(
            tokenizers[run], instructions, inputs, sampling.max_prompt_tokens, sampling.prompt_format
        )
        return vllm_engine.generation_dataset(config, ids, sampling)

    def decoded(run: str, table: pa.Table) -> None:
        rows = vllm_engine.in_order(table.to_pylist(), gen.num_rows)
        finished(run, decode_answers(tokenizers[run], rows, sampling.prompt_format))

    run_waves(waves, build, decoded)


def merge(gen: pa.Table, answers: list[str] | None, scored: pa.Table | None) -> pa.Table:
    """A vLLM run's rows as the HF pass returns them: generation rows with their answers, then the held-out rows
    the HF actors scored."""
    parts = []
    if gen.num_rows:
        parts.append(with_results(gen, answers, [float("nan")] * gen.num_rows, [0] * gen.num_rows))
    if scored is not None:
        parts.append(scored.select(parts[0].column_names).cast(parts[0].schema) if parts else scored)
    return pa.concat_tables(parts).sort_by(POSITION)


def write_run(out: Location, table: pa.Table, key: str) -> dict:
    """An evaluated run's files, each written on its own, the `_done` marker (its key) last."""
    out.delete()  # this run's own folder, cut short before its marker
    kinds = np.asarray(table["kind"].to_pylist())
    gen = table.filter(pa.array(kinds == GENERATE))
    lines = [
        json.dumps(r, ensure_ascii=False) + "\n"
        for r in gen.select(["test_set", "id", "instruction", "input", "answer"]).to_pylist()
    ]
    (out / GENERATIONS).write_text("".join(lines))
    ref = table.filter(pa.array(kinds == HELDOUT))
    total_tokens = int(np.sum(ref["n_tokens"].to_numpy())) if ref.num_rows else 0
    heldout = {
        "examples": ref.num_rows,
        "tokens": total_tokens,
        "loss": float(np.sum(ref["loss_sum"].to_numpy()) / total_tokens) if total_tokens else None,
    }
    (out / HELDOUT_FILE).write_text(json.dumps(heldout, indent=2))
    (out / DONE_MARKER).write_text(key)
    return {"generations": gen.num_rows, "heldout_loss": heldout["loss"], "heldout_examples": ref.num_rows}


def _generations(payload: bytes) -> dict[tuple[str, str], dict]:
    return {(r["test_set"], r["id"]): r for r in map(json.loads, payload.decode("utf-8").splitlines())}


def judged_pairs(cfg: Config, run: RunDir, runs: dict[str, EvaluatedRun]) -> tuple[list[JudgedPair], dict]:
    """Every pair this config judges, keyed by the judge model and prompt and both answer files (read here: their
    sha256), and the answers of the runs in a pair."""
    j = cfg.evaluation.judge
    references = {name: reference_of(name, j.reference, runs) for name in runs}
    in_pairs = sorted({side for name, ref in references.items() if ref for side in (name, ref)})
    answers = {name: (run.at(runs[name].folder) / GENERATIONS).read_bytes() for name in in_pairs}
    digest = {name: hashlib.sha256(payload).hexdigest() for name, payload in answers.items()}
    pairs = [
        JudgedPair(name, ref, pair_key(j.model, digest[name], digest[ref])) for name, ref in references.items() if ref
    ]
    return pairs, answers


def judge_pairs(cfg: Config, cache: Path, pairs: list[JudgedPair], answers: dict[str, bytes]) -> dict:
    """Judge each pair, both answer orders per prompt: {pair name: (outcomes by (test_set, id), whether the judge
    replied to every request)}."""
    from gradfilter_ray.evaluation.judge import JudgeClient, judge_both_orders

    j = cfg.evaluation.judge
    client = JudgeClient(
        j.base_url,
        j.model,
        os.environ.get(j.api_key_env) or None,
        timeout_s=j.timeout_s,
        max_retries=j.max_retries,
        cache_path=cache,
    )
    judged = {}
    for pair in pairs:
        ours, theirs = _generations(answers[pair.run]), _generations(answers[pair.reference])
        keys = sorted(ours.keys() & theirs.keys())

        def one(key, ours=ours, theirs=theirs):
            row = ours[key]
            question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            return judge_both_orders(client, question, row["answer"], theirs[key]["answer"])

        with ThreadPoolExecutor(max_workers=j.concurrency) as pool:
            results = list(pool.map(one, keys))
        judged[pair.name] = (dict(zip(keys, (outcome for outcome, _ in results))), all(ok for _, ok in results))
    return judged


def pair_lines(outcomes: dict[tuple[str, str], str]) -> str:
    return "".join(
        json.dumps({"test_set": test_set, "id": pid, "outcome": outcome}) + "\n"
        for (test_set, pid), outcome in sorted(outcomes.items())
    )


def read_pair(payload: str) -> dict[tuple[str, str], str]:
    return {(r["test_set"], r["id"]): r["outcome"] for r in map(json.loads, payload.splitlines())}


def pair_summary(pair: JudgedPair, outcomes: dict[tuple[str, str], str]) -> dict:
    from gradfilter_ray.evaluation import pws

    per_set: dict[str, list[str]] = {}
    for (test_set, _), outcome in sorted(outcomes.items()):
        per_set.setdefault(test_set, []).append(outcome)
    return {
        "reference": pair.reference,
        "file": pair.file,
        "per_set": {s: pws.summarise(o) for s, o in sorted(per_set.items())},
        "overall": pws.summarise([o for _, o in sorted(outcomes.items())]),
    }


def judge_runs(
    cfg: Config, run: RunDir, key: str, runs: dict[str, EvaluatedRun], log=say, force: bool = False
) -> dict:
    """Judge every run against the reference scorer's run at the same ratio (the pairs without a file yet; `force`:
    every pair, its file removed first), and summarise every pair; the judge view (judge.json) with, besides, the
    pairs judged now and those kept."""
    j = cfg.evaluation.judge
    if not j.base_url:
        log("[evaluation] judge skipped: evaluation.judge.base_url is not set (held-out loss and curves still run)")
        return {"status": "skipped", "reason": "evaluation.judge.base_url is not set"}
    pairs, answers = judged_pairs(cfg, run, runs)
    run.add_references("evaluation", key, [pair.file for pair in pairs])  # before judging: a pair cut short counts
    if force:
        for pair in pairs:  # recorded above; the judge's cache stays, so no reply is paid for twice
            run.at(pair.file).delete()
    todo = [pair for pair in pairs if not run.at(pair.file).exists()]
    judged = {}
    if todo:
        with tempfile.TemporaryDirectory(prefix="gfr-judge-") as tmp:
            cache = Path(tmp) / JUDGE_CACHE
            if run.judge_cache.exists():
                run.judge_cache.get(cache)
            try:
                judged = judge_pairs(cfg, cache, todo, answers)
            finally:  # judgements are paid for: keep those made before a crash too (one whole-object write)
                if cache.exists():
                    run.judge_cache.write_bytes(cache.read_bytes())
    summaries, incomplete = {}, []
    for pair in pairs:
        if pair.name in judged:
            outcomes, answered = judged[pair.name]
            if answered:
                run.at(pair.file).write_text(pair_lines(outcomes))
            else:
                incomplete.append(pair.name)
        else:
            outcomes = read_pair(run.at(pair.file).read_text())
        summaries[pair.run] = pair_summary(pair, outcomes)
        log(f"[evaluation] judge {pair.run} vs {pair.reference}: " + json.dumps(summaries[pair.run]["overall"]))
    if incomplete:
        log(
            f"[evaluation] the judge did not reply to every request of {', '.join(incomplete)} (counted invalid): "
            "not kept, so the next run of this stage asks again for those replies only"
        )
    return {
        "status": "ran",
        "model": j.model,
        "runs": summaries,
        "judged": [pair.name for pair in todo],
        "incomplete": incomplete,
        "pairs": {pair.name: pair.file for pair in pairs},
    }


def run(cfg: Config, run: RunDir, key: str, log=say, force: bool = False) -> dict:
    """Evaluate this config's runs that no finished folder holds yet, judge the pairs not judged yet (`force`: every
    run and pair of this config, removed first), and write this config's view (runs.json, judge.json and the
    comparison)."""
    from gradfilter_ray.evaluation.compare import COMPARISON, VIEW_INPUTS, publish, write_comparison

    summary = json.loads((run.finetune / "summary.json").read_text())
    rows = evaluation_rows(cfg.evaluation)
    models = {name: run.at(info["folder"]) / "model" for name, info in summary["runs"].items()}
    # The run keys carry the engine that answers. An explicit one keys as set: whether it can run here is asked
    # only when a run needs answers, so a run directory evaluated elsewhere can still be judged and compared.
    chosen = answering_engine(cfg, models) if cfg.evaluation.engine == "auto" else None
    runs = evaluated_runs(cfg, summary["runs"], chosen[0] if chosen else cfg.evaluation.engine)
    run.add_references("evaluation", key, [r.folder for r in runs.values()])  # before the work: a cut run counts
    if force:
        log(f"[evaluation] forced: {len(runs)} run(s) evaluated and judged again")
        for r in runs.values():  # recorded above, so a forced run cut short leaves nothing unreferenced
            run.at(r.folder).delete()
    todo = {name: r for name, r in runs.items() if not unit_finished(run.at(r.folder), r.key)}
    if len(todo) < len(runs):
        kept = sorted(set(runs) - set(todo))
        log(f"[evaluation] {len(kept)} run(s) already evaluated under the same key: {', '.join(kept)}")
    if todo:
        todo_models = {name: models[name] for name in todo}

        def finished(name: str, table: pa.Table) -> None:
            write_run(run.at(todo[name].folder), table, todo[name].key)
            log(f"[evaluation] {name} evaluated: {todo[name].folder}")

        engine = chosen or answering_engine(cfg, todo_models)
        evaluate_runs(cfg, todo_models, rows, log=log, engine=engine, finished=finished)
    view = {}
    for name, r in runs.items():
        heldout = json.loads((run.at(r.folder) / HELDOUT_FILE).read_text())
        selection = Selection.parse(name)
        view[name] = {
            "scorer": selection.scorer,
            "ratio": selection.ratio,
            "n_train": r.n_train,
            "generations": sum(row["kind"] == GENERATE for row in rows),
            "heldout_loss": heldout["loss"],
            "heldout_examples": heldout["examples"],
            "folder": r.folder,
            "finetune": r.subset,
        }
    judge = judge_runs(cfg, run, key, runs, log=log, force=force)
    with tempfile.TemporaryDirectory(prefix="gfr-eval-") as tmp:
        local = Path(tmp)
        (local / "judge.json").write_text(json.dumps(judge, indent=2))
        (local / "runs.json").write_text(json.dumps(view, indent=2))
        write_comparison(local, run.root)
        publish(local, run.evaluation, VIEW_INPUTS + COMPARISON)
    return {
        "runs": len(runs),
        "units": {**{name: r.folder for name, r in runs.items()}, **judge.get("pairs", {})},
        "generated": sorted(todo),
        "judged": judge.get("judged", []),
        "prompts": sum(r["kind"] == GENERATE for r in rows),
        "heldout_examples": sum(r["kind"] == HELDOUT for r in rows),
        "judge": judge["status"],
        "heldout_loss": {k: v["heldout_loss"] for k, v in view.items()},
    }
