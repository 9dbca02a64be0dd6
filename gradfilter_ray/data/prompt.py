"""Alpaca prompt template and response-only tokenisation (pure functions over a tokenizer).

Prompt and response are encoded separately and concatenated, so the label mask is exact by construction: -100 on
BOS and every prompt token, the response token ids (and EOS when it fits) as labels. Over-long examples lose the
tail of their response, never the prompt; an example left with no response token is not trainable and is
reported with `NO_RESPONSE_TOKENS` instead of being silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradfilter_ray.losses import IGNORE_INDEX

NO_RESPONSE_TOKENS = "no_response_tokens"

# The Stanford Alpaca template (tatsu-lab/stanford_alpaca train.py), used by the paper and by Superfiltering.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input_: str | None) -> str:
    if input_ and input_.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def default_add_bos(tokenizer) -> bool:
    """LLaMA-style tokenizers (BOS distinct from EOS) prepend BOS; GPT-2 (BOS == EOS == <|endoftext|>) does not."""
    return tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    n_response_tokens: int
    truncated: bool


def assemble(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    bos_id: int | None,
    eos_id: int | None,
) -> Tokenized:
    """[BOS] + prompt + response + [EOS], cut to max_length from the response's end; labels on the response only."""
    head = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    tail = list(response_ids) + ([eos_id] if eos_id is not None else [])
    room = max(0, max_length - len(head))
    truncated = len(tail) > room
    tail = tail[:room]
    if not tail:
        head = head[:max_length]
    labels = [IGNORE_INDEX] * len(head) + tail
    if not head and labels:
        labels[0] = IGNORE_INDEX  # a first token with no context is never predicted (labels shift by one)
    return Tokenized(
        input_ids=head + tail,
        labels=labels,
        n_response_tokens=sum(1 for label in labels if label != IGNORE_INDEX),
        truncated=truncated,
    )


def tokenize_batch(
    tokenizer,
    instructions: list[str],
    inputs: list[str],
    outputs: list[str],
    max_length: int,
    add_bos: bool | None = None,
    add_eos: bool = True,
) -> list[Tokenized]:
    """Tokenise a batch of Alpaca rows (the fast tokenizer encodes the whole batch at once)."""
    prompts = [alpaca_prompt(i, x) for i, x in zip(instructions, inputs)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
    use_bos = default_add_bos(tokenizer) if add_bos is None else add_bos
    bos_id = tokenizer.bos_token_id if use_bos else None
    eos_id = tokenizer.eos_token_id if add_eos else None
    return [assemble(p, r, max_length, bos_id, eos_id) for p, r in zip(prompt_ids, response_ids)]


def tokenize_response_only(tokenizer, outputs: list[str], max_length: int, add_bos: bool | None = None):
    """The response alone (for IFD's unconditioned perplexity), after a BOS so its first token is predicted too.

    GPT-2's BOS is <|endoftext|>, the usual start-of-text context; without any BOS the first token goes unscored.
    """
    response_ids = tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id if add_bos is not False else None
    return [assemble([], r, max_length, bos_id, tokenizer.eos_token_id) for r in response_ids]


def label_start(ex: Tokenized) -> int:
    """Index of the first labelled token (labels are contiguous from there to the end)."""
    for i, label in enumerate(ex.labels):
        if label != IGNORE_INDEX:
            return i
    return len(ex.labels)


def spans_from_labels(labels: list[int]) -> list[int]:
    """The labelled positions of a row as flat [start, stop) pairs: [s0, e0, s1, e1, ...]."""
    spans: list[int] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if spans and spans[-1] == i:
            spans[-1] = i + 1
        else:
            spans += [i, i + 1]
    return spans


def _spans(labels_at, n: int) -> list[tuple[int, int]]:
    if np.ndim(labels_at) == 0:  # a first labelled position: labelled from there to the end
        return [(int(labels_at), n)]
    flat = np.asarray(labels_at, dtype=np.int64)
    return list(zip(flat[0::2].tolist(), flat[1::2].tolist()))


def collate_rows(input_ids: list, labels_at, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows; labels = the ids at each row's labelled positions, given per row as its first labelled
    position (labelled to the end: an Alpaca row) or as flat [start, stop) spans (a conversation's answers).
    Returns [B, T] int64 tensors."""
    width = max(1, max(len(ids) for ids in input_ids))
    batch = len(input_ids)
    ids_t = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (ids, at) in enumerate(zip(input_ids, labels_at)):
        n = len(ids)
        row_ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        ids_t[row, :n] = row_ids
        attention_mask[row, :n] = 1
        for start, stop in _spans(at, n):
            labels[row, start:stop] = row_ids[start:stop]
    return {"input_ids": ids_t, "attention_mask": attention_mask, "labels": labels}


def collate(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [B, T] int64."""
    return collate_rows([e.input_ids for e in examples], [label_start(e) for e in examples], pad_id)
