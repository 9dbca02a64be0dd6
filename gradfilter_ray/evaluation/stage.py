"""Evaluation stage (Ray shell): every fine-tuned run's answers to the test prompts and its loss on the held-out
reference answers, all runs at once on actor pools as wide as the cluster allows; then, when a judge endpoint is
configured, pairwise judging of every run against the reference scorer's run at the same ratio; finally the
comparison table and plots (compare.py).

Concurrency: one Ray Data dataset (and actor pool) per run, the runs of a wave consumed side by side from driver
threads (plan.py shares the actors out and cuts the waves). Not one dataset keyed by run: an actor holds one model
(a 7B model fills most of a GPU, loading another per batch would cost minutes) and Ray Data cannot route a row to
the actor that holds its run's model. The datasets are built in the driver's main thread, only their streaming runs
in the threads.

Engines (plan.choose_engine): `hf` runs generation and held-out scoring in one pass of `hf_engine.ModelEvaluator`
actors, as before; `vllm` generates through Ray Data's vLLM processor (vllm_engine.py) and then scores the held-out
answers with `hf` actors (a forward pass; vLLM is not used for it), one phase after the other so the two never hold
a GPU at once.

Outputs under ``output_dir/evaluation/``: ``runs/{run}/generations.jsonl`` (test_set, id, instruction, input, answer),
``runs/{run}/heldout.json``, ``runs/{run}/judge_vs_{reference}.jsonl`` (per prompt outcome) and the comparison
files, built by the driver in a local folder and written to ``output_dir/evaluation/`` at the end (they are small); the
models are read by the actors. The judge's cache lives at ``output_dir/.judge_cache.jsonl`` so a re-run pays for no
pair twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
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
from gradfilter_ray.evaluation.plan import choose_engine, cluster_width, plan_waves
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.runtime import ALLOC_CONF, ALLOC_CONF_ENV, allocator_env
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location

JUDGE_CACHE = ".judge_cache.jsonl"


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


def run_waves(waves: list[dict[str, int]], build) -> dict[str, pa.Table]:
    """Each wave's runs evaluated side by side: `build(run, actors)` makes a run's dataset (main thread), a thread
    per run streams it. A wave ends when all its runs have; a failed run fails the stage once its wave is over."""
    results: dict[str, pa.Table] = {}
    for wave in waves:
        datasets = {run: build(run, actors) for run, actors in wave.items()}
        with ThreadPoolExecutor(max_workers=len(datasets), thread_name_prefix="gfr-eval") as pool:
            futures = {run: pool.submit(collect, ds) for run, ds in datasets.items()}
        results.update({run: future.result() for run, future in futures.items()})
    return results


def evaluate_runs(
    cfg: Config, models: dict[str, Location], rows: list[dict], log=say, evaluator: type = ModelEvaluator
) -> dict[str, pa.Table]:
    """Every run's rows with their answers and held-out losses (one table per run, rows in sorted order)."""
    import ray

    from gradfilter_ray.evaluation.vllm_engine import vllm_installed

    ev = cfg.evaluation
    table = sorted_table(rows)
    local = all(m.is_local for m in models.values())
    engine, why = choose_engine(ev.engine, ev.gpus_per_actor, vllm_installed(), local)
    actors = ev.num_actors or cluster_width(ray.cluster_resources(), ev.cpus_per_actor, ev.gpus_per_actor)
    log(f"[evaluation] engine {engine} ({why}); {len(models)} runs on up to {actors} actors")

    def hf_build(part: pa.Table):
        return lambda run, width: hf_dataset(
            part, models[run], ev, cfg.finetune.max_length, width, evaluator, cfg.finetune.template
        )

    def waves(part: pa.Table, phase: str) -> list[dict[str, int]]:
        planned = plan_waves({run: n_batches(part.num_rows, ev.batch_size) for run in models}, actors)
        if planned:
            log(f"[evaluation] {phase}: actors per run, by wave: " + " then ".join(json.dumps(w) for w in planned))
        return planned

    if engine == "hf":
        results = run_waves(waves(table, "answers and held-out losses (hf)"), hf_build(table))
    else:
        kinds = np.asarray(table["kind"].to_pylist())
        gen, ref = table.filter(pa.array(kinds == GENERATE)), table.filter(pa.array(kinds == HELDOUT))
        answered = vllm_answers(cfg, models, gen, waves(gen, "answers (vllm)")) if gen.num_rows else {}
        scored = run_waves(waves(ref, "held-out losses (hf)"), hf_build(ref)) if ref.num_rows else {}
        results = {run: merge(gen, answered.get(run), scored.get(run)) for run in models}
    for run, result in results.items():
        if result.num_rows != table.num_rows or result[POSITION].to_pylist() != list(range(table.num_rows)):
            raise RuntimeError(f"evaluation of {run} returned {result.num_rows} rows for {table.num_rows} inputs")
    return results


def vllm_answers(
    cfg: Config, models: dict[str, Location], gen: pa.Table, waves: list[dict[str, int]]
) -> dict[str, list[str]]:
    """Every run's answers to the generation rows (in their order), through vLLM; the driver tokenizes and decodes
    with the run's own tokenizer (the same functions the HF path uses)."""
    from transformers import AutoTokenizer

    from gradfilter_ray.evaluation import vllm_engine
    from gradfilter_ray.evaluation.generate import Sampling, decode_answers, prompt_token_ids

    ev = cfg.evaluation
    sampling = Sampling(
        ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_p, cfg.finetune.max_length, cfg.finetune.template
    )
    instructions, inputs = gen["instruction"].to_pylist(), gen["input"].to_pylist()
    tokenizers = {run: AutoTokenizer.from_pretrained(model.path) for run, model in models.items()}

    job_allocator = allocator_env()

    def build(run: str, width: int):
        model_config = json.loads((models[run] / "config.json").read_text())
        config = vllm_engine.processor_config(
            models[run].path,
            actors=width,
            batch_size=ev.batch_size,
            cpus_per_actor=ev.cpus_per_actor,
            gpus_per_actor=ev.gpus_per_actor,
            sampling=sampling,
            model_max_len=model_config.get("max_position_embeddings"),
            extra_engine_kwargs=ev.vllm_engine_kwargs,
            allocator_env=job_allocator if job_allocator == {ALLOC_CONF_ENV: ALLOC_CONF} else None,  # ours only
        )
        ids = prompt_token_ids(
            tokenizers[run], instructions, inputs, sampling.max_prompt_tokens, sampling.prompt_format
        )
        return vllm_engine.generation_dataset(config, ids, sampling)

    generated = run_waves(waves, build)
    return {
        run: decode_answers(
            tokenizers[run], vllm_engine.in_order(table.to_pylist(), gen.num_rows), sampling.prompt_format
        )
        for run, table in generated.items()
    }


def merge(gen: pa.Table, answers: list[str] | None, scored: pa.Table | None) -> pa.Table:
    """A vLLM run's rows as the HF pass returns them: generation rows with their answers, then the held-out rows
    the HF actors scored."""
    parts = []
    if gen.num_rows:
        parts.append(with_results(gen, answers, [float("nan")] * gen.num_rows, [0] * gen.num_rows))
    if scored is not None:
        parts.append(scored.select(parts[0].column_names).cast(parts[0].schema) if parts else scored)
    return pa.concat_tables(parts).sort_by(POSITION)


def _write_run(out: Path, table: pa.Table) -> dict:
    out.mkdir(parents=True)
    kinds = np.asarray(table["kind"].to_pylist())
    gen = table.filter(pa.array(kinds == GENERATE))
    with (out / "generations.jsonl").open("w", encoding="utf-8") as fh:
        for r in gen.select(["test_set", "id", "instruction", "input", "answer"]).to_pylist():
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    ref = table.filter(pa.array(kinds == HELDOUT))
    total_tokens = int(np.sum(ref["n_tokens"].to_numpy())) if ref.num_rows else 0
    heldout = {
        "examples": ref.num_rows,
        "tokens": total_tokens,
        "loss": float(np.sum(ref["loss_sum"].to_numpy()) / total_tokens) if total_tokens else None,
    }
    (out / "heldout.json").write_text(json.dumps(heldout, indent=2))
    return {"generations": gen.num_rows, "heldout_loss": heldout["loss"], "heldout_examples": ref.num_rows}


def _read_generations(path: Path) -> dict[tuple[str, str], dict]:
    with path.open(encoding="utf-8") as fh:
        return {(r["test_set"], r["id"]): r for r in map(json.loads, fh)}


def judge_runs(cfg: Config, cache: Path, eval_dir: Path, runs: dict[str, dict], log=say) -> dict:
    """Judge every run against the reference scorer's run at the same ratio, both answer orders per prompt."""
    from gradfilter_ray.evaluation import pws
    from gradfilter_ray.evaluation.judge import JudgeClient, judge_pair

    j = cfg.evaluation.judge
    if not j.base_url:
        log("[evaluation] judge skipped: evaluation.judge.base_url is not set (held-out loss and curves still run)")
        return {"status": "skipped", "reason": "evaluation.judge.base_url is not set"}
    client = JudgeClient(
        j.base_url,
        j.model,
        os.environ.get(j.api_key_env) or None,
        timeout_s=j.timeout_s,
        max_retries=j.max_retries,
        cache_path=cache,
    )
    results = {}
    for run, info in runs.items():
        reference = FULL if info["scorer"] == FULL else Selection(j.reference, info["ratio"]).name
        if info["scorer"] == j.reference or reference not in runs or reference == run:
            continue
        ours = _read_generations(eval_dir / "runs" / run / "generations.jsonl")
        theirs = _read_generations(eval_dir / "runs" / reference / "generations.jsonl")
        keys = sorted(ours.keys() & theirs.keys())

        def one(key, ours=ours, theirs=theirs):
            row = ours[key]
            question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            return judge_pair(client, question, row["answer"], theirs[key]["answer"])

        with ThreadPoolExecutor(max_workers=j.concurrency) as pool:
            outcomes = list(pool.map(one, keys))
        with (eval_dir / "runs" / run / f"judge_vs_{j.reference}.jsonl").open("w", encoding="utf-8") as fh:
            for (test_set, pid), outcome in zip(keys, outcomes):
                fh.write(json.dumps({"test_set": test_set, "id": pid, "outcome": outcome}) + "\n")
        per_set: dict[str, list[str]] = {}
        for (test_set, _), outcome in zip(keys, outcomes):
            per_set.setdefault(test_set, []).append(outcome)
        results[run] = {
            "reference": reference,
            "per_set": {s: pws.summarise(o) for s, o in sorted(per_set.items())},
            "overall": pws.summarise(outcomes),
        }
        log(f"[evaluation] judge {run} vs {reference}: " + json.dumps(results[run]["overall"]))
    return {"status": "ran", "model": j.model, "runs": results}


def run(cfg: Config, run: RunDir, key: str, log=say) -> dict:
    from gradfilter_ray.evaluation.compare import write_comparison

    summary = json.loads((run.finetune / "summary.json").read_text())
    rows = evaluation_rows(cfg.evaluation)
    with tempfile.TemporaryDirectory(prefix="gfr-eval-") as tmp:
        eval_dir = Path(tmp) / "evaluation"
        eval_dir.mkdir()
        models = {name: run.finetune / name / "model" for name in summary["runs"]}
        tables = evaluate_runs(cfg, models, rows, log=log)
        runs = {}
        for run_name, train in summary["runs"].items():
            selection = Selection.parse(run_name)
            info = {"scorer": selection.scorer, "ratio": selection.ratio, "n_train": train["rows_trained"]}
            runs[run_name] = {**info, **_write_run(eval_dir / "runs" / run_name, tables[run_name])}
        cache = Path(tmp) / JUDGE_CACHE
        if cfg.evaluation.judge.base_url and run.judge_cache.exists():
            run.judge_cache.get(cache)
        try:
            judge = judge_runs(cfg, cache, eval_dir, runs, log=log)
        finally:  # judgements are paid for: keep those made before a crash too (one whole-object write)
            if cache.exists():
                run.judge_cache.write_bytes(cache.read_bytes())
        (eval_dir / "judge.json").write_text(json.dumps(judge, indent=2))
        (eval_dir / "runs.json").write_text(json.dumps(runs, indent=2))
        write_comparison(eval_dir, run.finetune)
        run.evaluation.put(eval_dir)
    return {
        "runs": len(runs),
        "prompts": sum(r["kind"] == GENERATE for r in rows),
        "heldout_examples": sum(r["kind"] == HELDOUT for r in rows),
        "judge": judge["status"],
        "heldout_loss": {k: v["heldout_loss"] for k, v in runs.items()},
    }
