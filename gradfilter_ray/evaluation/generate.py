"""Evaluating one fine-tuned model (no Ray): greedy or sampled answers to test prompts, and the response-token
loss on reference answers. The prompt is in the format the model was trained in: the Alpaca template, or its chat
template (one user turn: the instruction, then its input)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradfilter_ray.data.chat_tokens import template_errors
from gradfilter_ray.data.prompt import alpaca_prompt, collate_rows, default_add_bos, spans_from_labels, tokenize_batch
from gradfilter_ray.data.tokenized import as_turns, chat_tokenize, untrained
from gradfilter_ray.losses import per_example_losses


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_prompt_tokens: int = 1024
    prompt_format: str = "alpaca"  # or "chat" (finetune.template)


def prompt_token_ids(
    tokenizer, instructions: list[str], inputs: list[str], max_prompt_tokens: int, prompt_format: str = "alpaca"
) -> list[list[int]]:
    """The token ids every engine is given for these prompts, cut from the left to `max_prompt_tokens` (the end is
    where the answer starts): [BOS] + the Alpaca prompt, or one user turn rendered by the tokenizer's chat template
    with its generation prompt (tokenised whole, as in training)."""
    if prompt_format == "chat":
        prompts = [
            tokenizer.apply_chat_template(as_turns(i, x, "", None)[:1], tokenize=False, add_generation_prompt=True)
            for i, x in zip(instructions, inputs)
        ]
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [ids[-max_prompt_tokens:] for ids in encoded]
    prompts = [alpaca_prompt(i, x) for i, x in zip(instructions, inputs)]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if default_add_bos(tokenizer) else []
    return [(bos + ids)[-max_prompt_tokens:] for ids in encoded]


SENTINEL = "\x00gfr-answer\x00"


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes after an answer (e.g. "<|im_end|>"), stripped: a config template on a base
    model writes it as plain text, which decoding does not drop and generation does not stop at."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}], tokenize=False
    )
    return rendered.split(SENTINEL, 1)[-1].strip() if SENTINEL in rendered else ""


def decode_answers(tokenizer, generated: list, prompt_format: str = "alpaca") -> list[str]:
    """Generated token ids -> answer strings, special tokens (EOS, padding) dropped, a chat answer cut at its
    end-of-turn text: one decoding for every engine."""
    answers = tokenizer.batch_decode(generated, skip_special_tokens=True)
    marker = end_of_turn_text(tokenizer) if prompt_format == "chat" else ""
    return [a.split(marker, 1)[0] for a in answers] if marker else answers


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: list[str], inputs: list[str], sampling: Sampling) -> list[str]:
    """Answers for a batch of prompts, [B] strings: prompts left-padded so every row continues from its last
    token; only the new tokens are decoded (special tokens dropped)."""
    rows = prompt_token_ids(tokenizer, instructions, inputs, sampling.max_prompt_tokens, sampling.prompt_format)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.as_tensor(r)
        attention[i, width - len(r) :] = 1
    options = {"do_sample": sampling.do_sample, "max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad}
    if sampling.do_sample:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **options)
    return decode_answers(tokenizer, out[:, width:], sampling.prompt_format)


@torch.no_grad()
def reference_losses(
    model,
    tokenizer,
    instructions: list[str],
    inputs: list[str],
    outputs: list[str],
    max_length: int,
    prompt_format: str = "alpaca",
) -> tuple[list[float], list[int]]:
    """Per example: (sum of response-token cross-entropies, number of response tokens), so a corpus-level loss is
    sum / count. An empty reference answer still scores its EOS token (its end-of-turn marker under chat)."""
    if prompt_format == "chat":
        examples = [_chat_reference(tokenizer, i, x, o, max_length) for i, x, o in zip(instructions, inputs, outputs)]
    else:
        examples = tokenize_batch(tokenizer, instructions, inputs, outputs, max_length)
    device = next(model.parameters()).device
    spans = [spans_from_labels(e.labels) for e in examples]
    batch = collate_rows([e.input_ids for e in examples], spans, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    means, counts = per_example_losses(logits, batch["labels"])
    counts_list = [int(c) for c in counts.tolist()]
    return [float(m) * c if c else 0.0 for m, c in zip(means.tolist(), counts_list)], counts_list


def _chat_reference(tokenizer, instruction: str, input_: str, output: str, max_length: int):
    """A reference answer through the chat template; one the template refuses scores no token (0 of the held-out
    tokens, so it weighs nothing in the loss) instead of failing the run."""
    try:
        return chat_tokenize(tokenizer, as_turns(instruction, input_, output, None), max_length)
    except template_errors():
        return untrained(tokenizer(instruction, add_special_tokens=False)["input_ids"][:1])
