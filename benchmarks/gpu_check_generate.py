"""Generation throughput of a saved fine-tuned model, loaded as the evaluation actor loads it.

The folder written by the finetune stage's final save is read back with `AutoTokenizer` / `AutoModelForCausalLM`
(what `evaluation.stage.ModelEvaluator` does), and `evaluation.generate.generate_answers` answers real test-set
prompts greedily at each batch size. EOS is switched off so every row generates exactly `max_new_tokens` new
tokens: a random-init model stops at a random point otherwise, and the rate would not be comparable between
batches. The sizing table then treats every answer as running to max_new_tokens (an upper bound for real answers).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gradfilter_ray.evaluation.generate import Sampling, generate_answers
from gradfilter_ray.evaluation.testsets import TEST_SETS, load_test_set


def eval_prompts(n: int) -> list[dict]:
    pooled = [row for name in TEST_SETS for row in load_test_set(name)]
    return pooled[:n]


class CountingGenerate:
    """Wraps model.generate to record how many new positions each call produced (generate_answers returns text)."""

    def __init__(self, model) -> None:
        self.inner, self.new_tokens, self.prompt_width = model.generate, [], []
        model.generate = self

    def __call__(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        self.prompt_width.append(int(input_ids.shape[1]))
        self.new_tokens.append(int((out.shape[1] - input_ids.shape[1]) * out.shape[0]))
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_saved(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return tokenizer, model


def generation(
    folder: Path, dtype, device, batches: tuple[int, ...], max_new_tokens: int, max_prompt_tokens: int
) -> dict:
    started = time.perf_counter()
    tokenizer, model = load_saved(folder, dtype, device)
    _sync(device)
    load_s = time.perf_counter() - started
    model.generation_config.eos_token_id = None  # fixed-length answers (see the module docstring)
    counter = CountingGenerate(model)
    prompts = eval_prompts(max(batches))
    sampling = Sampling(max_new_tokens=max_new_tokens, do_sample=False, max_prompt_tokens=max_prompt_tokens)

    def answer(rows: list[dict], s: Sampling) -> list[str]:
        return generate_answers(model, tokenizer, [r["instruction"] for r in rows], [r["input"] for r in rows], s)

    answer(prompts[:2], Sampling(max_new_tokens=2, max_prompt_tokens=max_prompt_tokens))  # warm-up: kernels, cache
    result = {"load_s": round(load_s, 3), "max_new_tokens": max_new_tokens, "batches": {}}
    for b in batches:
        _sync(device)
        t0 = time.perf_counter()
        answers = answer(prompts[:b], sampling)
        _sync(device)
        seconds = time.perf_counter() - t0
        result["batches"][str(b)] = {
            "answers": len(answers),
            "all_text": all(isinstance(a, str) for a in answers),
            "prompt_width": counter.prompt_width[-1],
            "new_tokens": counter.new_tokens[-1],
            "seconds": round(seconds, 4),
            "new_tokens_per_s": round(counter.new_tokens[-1] / seconds, 1),
        }
    return result
