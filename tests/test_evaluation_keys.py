"""The evaluation's unit keys: an evaluated run is redone when its answers would change (generation settings, the
prompt format, the model it evaluates) and never for the judge or how wide the evaluation runs; a judged pair is
judged again for another judge model or other answers, never for a timeout."""

from __future__ import annotations

import pytest

from gradfilter_ray.config import load
from gradfilter_ray.evaluation.keys import pair_file, pair_key, run_key

SUBSET = "0123456789abcdef"


def _run_key(*overrides: str, subset: str = SUBSET, engine: str = "hf") -> str:
    return run_key(load(None, list(overrides)), subset, engine)


def test_an_evaluated_run_is_keyed_by_its_answers_inputs_and_its_model():
    base = _run_key()
    assert _run_key("evaluation.max_new_tokens=64") != base
    assert _run_key("evaluation.test_sets=[vicuna]") != base
    assert _run_key("finetune.max_length=512") != base
    assert _run_key("finetune.template=chat") != base
    assert _run_key(subset="fedcba9876543210") != base  # another model


def test_an_evaluated_run_is_keyed_by_the_engine_that_answers_it_not_by_the_setting():
    # auto on GPUs resolves to vllm in the stage's key; where vllm is missing hf answers, and the run says so
    on_gpu = "evaluation.gpus_per_actor=1"
    assert _run_key(on_gpu, "evaluation.engine=auto", engine="vllm") != _run_key(on_gpu, "evaluation.engine=auto")
    assert _run_key(on_gpu, "evaluation.engine=auto") == _run_key(on_gpu, "evaluation.engine=hf")
    assert _run_key(on_gpu, "evaluation.engine=auto", engine="vllm") == _run_key(
        on_gpu, "evaluation.engine=vllm", engine="vllm"
    )
    with pytest.raises(ValueError, match="auto"):
        _run_key(engine="auto")


def test_an_evaluated_run_is_not_keyed_by_the_judge_or_the_evaluations_width():
    base = _run_key()
    for override in [
        "evaluation.judge.model=judge-2",
        "evaluation.judge.base_url=http://localhost:1/v1",
        "evaluation.judge.reference=gsnr",
        "evaluation.judge.timeout_s=5",
        "evaluation.batch_size=2",
        "evaluation.num_actors=3",
        "evaluation.cpus_per_actor=2",
        "finetune.learning_rate=0.1",  # reaches the run through its subset's key, not here
        "finetune.ratios=[0.1]",
    ]:
        assert _run_key(override) == base, override


def test_a_judged_pair_is_keyed_by_the_judge_model_and_both_answer_files():
    ours, theirs = "a" * 64, "b" * 64

    def key(*overrides: str, answers: str = ours, reference: str = theirs) -> str:
        return pair_key(load(None, list(overrides)).evaluation.judge.model, answers, reference)

    base = key()
    assert key("evaluation.judge.model=judge-2") != base
    assert key(answers="c" * 64) != base and key(reference="c" * 64) != base
    assert key(answers=theirs, reference=ours) != base  # which side is ours matters
    assert key("evaluation.judge.timeout_s=5") == base and key("evaluation.judge.concurrency=1") == base
    assert pair_file("gsnr_0.1", "random_0.1", base) == f"gsnr_0.1_vs_random_0.1-{base}.jsonl"
