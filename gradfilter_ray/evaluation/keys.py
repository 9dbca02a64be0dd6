"""The keys of the evaluation's units (pure: no Ray, no I/O): an evaluated run and a judged pair, each keyed by
exactly what its output is computed from.

- An evaluated run (`evaluation/runs/{name}-{key}/`: its answers and held-out loss) is keyed by the keyed
  evaluation fields less the judge, the engine that actually answers (`plan.choose_engine`'s choice for this run:
  vllm and hf decode differently), the prompt format the model answers in (`finetune.max_length`, `template`,
  `chat_template`) and the key of the fine-tuned subset it evaluates (its model). A new judge, or a new subset
  beside it, leaves it as it is. The stage's own key takes `evaluation.engine` as `config.RESOLVED_VALUES` resolves
  it (by the config alone, `auto` on GPUs as vllm); only the run's key knows whether vllm was installed and the
  models local, so an `auto` run answered by hf is never mistaken for a vllm one.
- A judged pair (`evaluation/judge/{run}_vs_{reference}-{key}.jsonl`: one outcome per prompt) is keyed by the
  judge model, the judge's prompt (`judge.JUDGE_PROMPT`) and the sha256 of both answer files: answers that did not
  change are never judged twice.
"""

from __future__ import annotations

from gradfilter_ray.config import Config, keyed_value, section_hash
from gradfilter_ray.evaluation.judge import JUDGE_PROMPT
from gradfilter_ray.evaluation.plan import ENGINES
from gradfilter_ray.units import unit_name

PROMPT_FORMAT = ("finetune.max_length", "finetune.template", "finetune.chat_template")


def run_fields(cfg: Config, engine: str) -> dict:
    """What an evaluated run's answers and held-out loss are computed from, besides its model: `engine` is the one
    that answers (vllm or hf, as `plan.choose_engine` chose it), in place of the config's resolved setting."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    evaluation = {k: v for k, v in keyed_value(cfg, "evaluation").items() if k != "judge"}
    evaluation["engine"] = engine
    return {"evaluation": evaluation, **{field: keyed_value(cfg, field) for field in PROMPT_FORMAT}}


def run_key(cfg: Config, subset_key: str, engine: str) -> str:
    """An evaluated run's key: `run_fields` (with the engine that answers) and the key of the subset whose model it
    evaluates."""
    return section_hash("evaluation-run", run_fields(cfg, engine), subset_key)


def pair_key(judge_model: str, answers_sha256: str, reference_sha256: str) -> str:
    """A judged pair's key: the judge model and prompt, and the sha256 of our answer file and the reference's."""
    return section_hash("judge-pair", judge_model, JUDGE_PROMPT, answers_sha256, reference_sha256)


def pair_file(run: str, reference: str, key: str) -> str:
    """A judged pair's file name under `evaluation/judge/`."""
    return f"{unit_name(f'{run}_vs_{reference}', key)}.jsonl"
