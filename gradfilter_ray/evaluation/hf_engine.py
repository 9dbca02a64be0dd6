"""Generation and held-out scoring through transformers (Ray shell): one run's rows streamed through a Ray Data actor
pool, every `ModelEvaluator` actor loading the run's model once.

Batches do not depend on the pool's width: the rows arrive sorted, cut into blocks of exactly `batch_size` rows,
and Ray Data hands each block to an actor as one batch, so every batch holds the same rows (and the same padding)
whether one actor or eight answer them; greedy answers are then the same too. The rows carry their position, so the
driver restores their order whichever actor finished first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa

from gradfilter_ray.config import EvaluationConfig, build
from gradfilter_ray.resources import Request
from gradfilter_ray.storage import Location

GENERATE, HELDOUT = "generate", "heldout"
POSITION = "position"  # a row's place in its run's sorted rows: results are put back in that order


class ModelEvaluator:
    """Ray Data callable class: loads one fine-tuned model once, then answers prompts and scores references."""

    def __init__(self, model: Location, evaluation: dict, max_length: int, prompt_format: str = "alpaca") -> None:
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
        self.sampling = Sampling(ev.max_new_tokens, ev.do_sample, ev.temperature, ev.top_p, max_length, prompt_format)
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
                self.sampling.prompt_format,
            )
            for i, s, c in zip(ref, sums, n):
                loss_sums[i], counts[i] = s, c
        return with_results(table, answers, loss_sums, counts)


def with_results(table: pa.Table, answers: list, loss_sums: list[float], counts: list[int]) -> pa.Table:
    """`table` with the evaluation's three result columns (the schema both engines' rows end up in)."""
    return (
        table.append_column("answer", pa.array(answers, pa.string()))
        .append_column("loss_sum", pa.array(loss_sums, pa.float64()))
        .append_column("n_tokens", pa.array(counts, pa.int64()))
    )


def batch_blocks(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """`table` cut into blocks of exactly `batch_size` rows (the last may be shorter), in order."""
    return [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]


def hf_dataset(
    table: pa.Table,
    model: Location,
    ev: EvaluationConfig,
    max_length: int,
    pool: Request,
    evaluator: type,
    prompt_format: str = "alpaca",
):
    """`table`'s rows (sorted, with their positions) through a pool of `evaluator`s of `model` (`pool`: the
    evaluation's `resources.evaluation_actors` with this run's width as its count), prompted in `prompt_format` (the
    format the model was fine-tuned in)."""
    from dataclasses import asdict

    import ray.data

    return ray.data.from_arrow(batch_blocks(table, ev.batch_size)).map_batches(
        evaluator,
        fn_constructor_kwargs={
            "model": model,
            "evaluation": asdict(ev),
            "max_length": max_length,
            "prompt_format": prompt_format,
        },
        batch_size=ev.batch_size,
        batch_format="pyarrow",
        **actor_pool_args(pool),
    )


def actor_pool_args(pool: Request) -> dict:
    """How a run's evaluators ask Ray for their actors: `pool.count` of them, each with the request's CPUs and GPUs,
    one batch in flight per actor."""
    import ray.data

    return {
        # One batch at a time per actor: a generate call holds its device until done, and batches queued on the
        # first actor ready would leave the later ones idle while it works through them (the rows move cheaply).
        "compute": ray.data.ActorPoolStrategy(size=pool.count, max_tasks_in_flight_per_actor=1),
        **pool.remote_args(),
    }
