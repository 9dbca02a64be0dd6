"""The keys of the evaluation's units (pure: no Ray, no I/O): an evaluated run and a judged pair, each keyed by
exactly what its output is computed from.

- An evaluated run (`evaluation/runs/{name}-{key}/`: its answers and held-out loss) is keyed by the keyed
  evaluation fields less the judge, the prompt format the model answers in (`finetune.max_length`, `template`,
  `chat_template`) and the key of the fine-tuned subset it evaluates (its model). A new judge, or a new subset
  beside it, leaves it as it is.
- A judged pair (`evaluation/judge/{run}_vs_{reference}-{key}.jsonl`: one outcome per prompt) is keyed by the
  judge model, the judge's prompt (`judge.JUDGE_PROMPT`) and the sha256 of both answer files: answers that did not
  change are never judged twice.
"""

from __future__ import annotations

from gradfilter_ray.config import Config, keyed_value, section_hash
from gradfilter_ray.evaluation.judge import JUDGE_PROMPT

PROMPT_FORMAT = ("finetune.max_length", "finetune.template", "finetune.chat_template")


def run_fields(cfg: Config) -> dict:
    """What an evaluated run's answers and held-out loss are computed from, besides its model."""
    evaluation = {k: v for k, v in keyed_value(cfg, "evaluation").items() if k != "judge"}
    return {"evaluation": evaluation, **{field: keyed_value(cfg, field) for field in PROMPT_FORMAT}}


def run_key(cfg: Config, subset_key: str) -> str:
    """An evaluated run's key: `run_fields` and the key of the subset whose model it evaluates."""
    return section_hash("evaluation-run", run_fields(cfg), subset_key)


def pair_key(judge_model: str, answers_sha256: str, reference_sha256: str) -> str:
    """A judged pair's key: the judge model and prompt, and the sha256 of our answer file and the reference's."""
    return section_hash("judge-pair", judge_model, JUDGE_PROMPT, answers_sha256, reference_sha256)


def pair_file(run: str, reference: str, key: str) -> str:
    """A judged pair's file name under `evaluation/judge/`."""
    return f"{run}_vs_{reference}-{key}.jsonl"
