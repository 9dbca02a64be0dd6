"""Alpaca template and response-only labels, checked token by token for GPT-2 and LLaMA tokenizers."""

import pytest
import torch

from gradfilter_ray.data.prompt import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    alpaca_prompt,
    assemble,
    collate,
    default_add_bos,
    tokenize_batch,
    tokenize_response_only,
)


def test_template_with_and_without_input():
    assert alpaca_prompt("Add", "") == PROMPT_NO_INPUT.format(instruction="Add")
    assert alpaca_prompt("Add", "   ") == PROMPT_NO_INPUT.format(instruction="Add")
    with_input = alpaca_prompt("Add", "2 and 3")
    assert with_input.endswith("### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")


def check_labels(tok, ex, instruction, inp, output, expect_bos):
    prompt_ids = tok(alpaca_prompt(instruction, inp), add_special_tokens=False)["input_ids"]
    response_ids = tok(output, add_special_tokens=False)["input_ids"]
    head = ([tok.bos_token_id] if expect_bos else []) + prompt_ids
    assert ex.input_ids == head + response_ids + [tok.eos_token_id]
    assert ex.labels[: len(head)] == [IGNORE_INDEX] * len(head)
    assert ex.labels[len(head) :] == response_ids + [tok.eos_token_id]
    assert ex.n_response_tokens == len(response_ids) + 1
    assert tok.decode(ex.labels[len(head) : -1]) == output
    assert tok.decode(prompt_ids) == alpaca_prompt(instruction, inp)


def test_gpt2_labels_token_by_token(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert not default_add_bos(tok)  # GPT-2: BOS == EOS == <|endoftext|>, no BOS prepended
    (ex,) = tokenize_batch(tok, ["Name a colour."], [""], ["Blue is a colour."], max_length=512)
    check_labels(tok, ex, "Name a colour.", "", "Blue is a colour.", expect_bos=False)
    assert ex.input_ids[-1] == 50256 and not ex.truncated


def test_llama_labels_token_by_token(llama_tokenizer):
    tok = llama_tokenizer
    assert default_add_bos(tok) and tok.bos_token_id == 1 and tok.eos_token_id == 2
    (ex,) = tokenize_batch(tok, ["Tell a story."], ["about a cat"], ["Once upon a time."], max_length=2048)
    check_labels(tok, ex, "Tell a story.", "about a cat", "Once upon a time.", expect_bos=True)
    assert ex.input_ids[0] == 1 and ex.input_ids[-1] == 2


def test_explicit_bos_and_eos_switches(gpt2_tokenizer, llama_tokenizer):
    (ex,) = tokenize_batch(llama_tokenizer, ["a"], [""], ["b"], 512, add_bos=False, add_eos=False)
    assert ex.input_ids[0] != 1 and ex.input_ids[-1] != 2
    (ex,) = tokenize_batch(gpt2_tokenizer, ["a"], [""], ["b"], 512, add_bos=True)
    assert ex.input_ids[0] == gpt2_tokenizer.bos_token_id


def test_truncation_cuts_the_response_tail_never_the_prompt():
    ex = assemble([10, 11, 12], [20, 21, 22, 23], max_length=6, bos_id=1, eos_id=2)
    assert ex.input_ids == [1, 10, 11, 12, 20, 21]
    assert ex.labels == [IGNORE_INDEX] * 4 + [20, 21]
    assert ex.truncated and ex.n_response_tokens == 2
    one = assemble([10, 11, 12], [20, 21], max_length=5, bos_id=1, eos_id=2)
    assert one.labels == [IGNORE_INDEX] * 4 + [20] and one.n_response_tokens == 1


def test_prompt_longer_than_max_length_leaves_no_response_token():
    ex = assemble(list(range(10, 20)), [20, 21], max_length=8, bos_id=1, eos_id=2)
    assert len(ex.input_ids) == 8 and ex.n_response_tokens == 0
    assert all(label == IGNORE_INDEX for label in ex.labels)


def test_response_only_scores_every_response_token(gpt2_tokenizer):
    (ex,) = tokenize_response_only(gpt2_tokenizer, ["Blue is a colour."], 512)
    ids = gpt2_tokenizer("Blue is a colour.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == [50256] + ids + [50256]
    assert ex.labels == [IGNORE_INDEX] + ids + [50256]
    bare = assemble([], [5, 6, 7], max_length=10, bos_id=None, eos_id=None)
    assert bare.labels == [IGNORE_INDEX, 6, 7] and bare.n_response_tokens == 2


def test_collate_right_pads_and_masks():
    a = assemble([10], [20, 21], 16, None, 2)
    b = assemble([10, 11, 12], [20], 16, None, 2)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 20, 21, 2, 0], [10, 11, 12, 20, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 20, 21, 2, IGNORE_INDEX]
    assert batch["labels"].dtype == torch.long


@pytest.mark.parametrize("max_length", [16, 512])
def test_batch_tokenisation_on_real_rows(gpt2_tokenizer, max_length):
    import json

    from conftest import ASSETS

    rows = json.loads((ASSETS / "data" / "alpaca_sample_1k.json").read_text())[:50]
    out = tokenize_batch(
        gpt2_tokenizer,
        [r["instruction"] for r in rows],
        [r["input"] for r in rows],
        [r["output"] for r in rows],
        max_length=max_length,
    )
    for ex in out:
        assert len(ex.input_ids) <= max_length
        assert ex.n_response_tokens == sum(label != IGNORE_INDEX for label in ex.labels)
    assert any(ex.n_response_tokens == 0 for ex in out) == (max_length == 16)
