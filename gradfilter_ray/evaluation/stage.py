"""Evaluation stage (Ray shell): per fine-tuned run, one Ray Data pass of batch inference over the test prompts
and the held-out reference answers; then, when a judge endpoint is configured, pairwise judging of every run
against the reference scorer's run at the same ratio; finally the comparison table and plots (compare.py).

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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradfilter_ray.config import Config, EvaluationConfig, build
from gradfilter_ray.rundir import RunDir
from gradfilter_ray.scoring.scorers import FULL, Selection
from gradfilter_ray.storage import Location

GENERATE, HELDOUT = "generate", "heldout"
JUDGE_CACHE = ".judge_cache.jsonl"


class ModelEvaluator:
    """Ray Data callable class: loads one fine-tuned model once, then answers prompts and scores references."""

    def __init__(self, model: Location, evaluation: dict, max_length: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gradfilter_ray.evaluation.generate import Sampling
        from gradfilter_ray.models import pick_device

        ev: EvaluationConfig = build(EvaluationConfig, evaluation, "evaluation")
        torch.set_num_threads(max(1, int(ev.cpus_per_actor)))
        self.device = pick_device(ev.gpus_per_actor)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model_dir = model.path
        if not model.is_local:  # an object-store run directory: fetch the folder to this node first
            self._download = tempfile.TemporaryDirectory(prefix="gfr-eval-model-")
            model_dir = str(model.get(Path(self._download.name) / "model"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.sampling = Sampling(ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_p, max_length)
        self.max_length = max_length
        self.seed = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from gradfilter_ray.evaluation.generate import generate_answers, reference_losses

        kinds = table["kind"].to_pylist()
        instructions = table["instruction"].to_pylist()
        inputs = table["input"].to_pylist()
        answers: list[str | None] = [None] * len(kinds)
        loss_sums = [float("nan")] * len(kinds)
        counts = [0] * len(kinds)
        gen = [i for i, k in enumerate(kinds) if k == GENERATE]
        if gen:
            torch.manual_seed(self.seed)  # sampled answers are reproducible per batch
            out = generate_answers(
                self.model, self.tokenizer, [instructions[i] for i in gen], [inputs[i] for i in gen], self.sampling
            )
            for i, a in zip(gen, out):
                answers[i] = a
        ref = [i for i, k in enumerate(kinds) if k == HELDOUT]
        if ref:
            outputs = table["output"].to_pylist()
            sums, n = reference_losses(
                self.model,
                self.tokenizer,
                [instructions[i] for i in ref],
                [inputs[i] for i in ref],
                [outputs[i] for i in ref],
                self.max_length,
            )
            for i, s, c in zip(ref, sums, n):
                loss_sums[i], counts[i] = s, c
        return (
            table.append_column("answer", pa.array(answers, pa.string()))
            .append_column("loss_sum", pa.array(loss_sums, pa.float64()))
            .append_column("n_tokens", pa.array(counts, pa.int64()))
        )


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


def evaluate_model(cfg: Config, model: Location, rows: list[dict]) -> pa.Table:
    import ray.data

    ev = cfg.evaluation
    # Generation rows first, held-out rows after, each block sorted by prompt length: batches stay homogeneous.
    rows = sorted(rows, key=lambda r: (r["kind"] != GENERATE, len(r["instruction"]) + len(r["input"])))
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows))
    ds = ds.map_batches(
        ModelEvaluator,
        fn_constructor_kwargs={
            "model": model,
            "evaluation": asdict(ev),
            "max_length": cfg.finetune.max_length,
        },
        batch_size=ev.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=ev.cpus_per_actor,
        num_gpus=ev.gpus_per_actor,
    )
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    if table.num_rows != len(rows):
        raise RuntimeError(f"evaluation returned {table.num_rows} rows for {len(rows)} inputs")
    return table


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


def judge_runs(cfg: Config, cache: Path, eval_dir: Path, runs: dict[str, dict], log=print) -> dict:
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


def run(cfg: Config, run: RunDir, key: str) -> dict:
    from gradfilter_ray.evaluation.compare import write_comparison

    summary = json.loads((run.finetune / "summary.json").read_text())
    rows = evaluation_rows(cfg.evaluation)
    with tempfile.TemporaryDirectory(prefix="gfr-eval-") as tmp:
        eval_dir = Path(tmp) / "evaluation"
        eval_dir.mkdir()
        runs = {}
        for run_name, train in summary["runs"].items():
            table = evaluate_model(cfg, run.finetune / run_name / "model", rows)
            selection = Selection.parse(run_name)
            info = {"scorer": selection.scorer, "ratio": selection.ratio, "n_train": train["rows_trained"]}
            runs[run_name] = {**info, **_write_run(eval_dir / "runs" / run_name, table)}
        cache = Path(tmp) / JUDGE_CACHE
        if cfg.evaluation.judge.base_url and run.judge_cache.exists():
            run.judge_cache.get(cache)
        try:
            judge = judge_runs(cfg, cache, eval_dir, runs)
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
