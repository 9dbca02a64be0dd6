"""Chat-template tokenisation (data/chat_tokens.py), token by token on known strings: a ChatML template, and one
whose generation prompt is not how it renders a finished answer (so an answer is not a plain suffix of the rendered
prompt); tool-call turns trained or not; truncation by whole trailing turns; a template that rewrites history is
refused; and the 300 real glaive conversations keep exactly their answers' text under the loss."""

from __future__ import annotations

import json

import pytest
from test_data_conversations import GLAIVE

from gradfilter_ray.config import ModelSpec
from gradfilter_ray.data.chat_tokens import (
    TemplateNotIncremental,
    cut_pieces,
    hf_render,
    tokenize_pieces,
    whole_text_encoder,
)
from gradfilter_ray.data.conversations import canonical_turns
from gradfilter_ray.losses import IGNORE_INDEX
from gradfilter_ray.models import load_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML with the conversation's tools in a system turn of their own, first (as tool-calling templates do)
CHATML_TOOLS = "{% if tools %}<|im_start|>system\nFunctions:\n{{ tools | tojson }}<|im_end|>\n{% endif %}" + CHATML
# The prompt for a new answer ends "<|assistant|>\n", but a finished answer is rendered "<|assistant|>" + text.
NOT_SUFFIX = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
REWRITES_HISTORY = (
    "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Call the map tool."},
    {"role": "tool_call", "content": '{"name": "map", "arguments": {"city": "Paris"}}'},
    {"role": "tool", "content": '{"ok": true}'},
    {"role": "assistant", "content": "Done."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec(name_or_path="bundled:stories260K"))


def merge_kinds(pieces):
    from gradfilter_ray.data.chat_tokens import Piece

    return [Piece(text, answer, 0) for text, answer in merged(pieces)]


def merged(pieces):
    """Adjacent pieces of the same kind joined: the text the loss sees and the text it does not."""
    out = []
    for p in pieces:
        if out and out[-1][1] == p.answer:
            out[-1] = (out[-1][0] + p.text, p.answer)
        else:
            out.append((p.text, p.answer))
    return out


def check_tokens(tokenizer, got, parts):
    """Independent of the offsets the encoder uses: the ids are the known text tokenised whole, and each maximal
    run of labelled tokens decodes to exactly one known answer string, in order (a border one character off would
    move a character into or out of a run)."""
    text = "".join(t for t, _ in parts)
    assert got.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    runs, run = [], []
    for tid, label in zip(got.input_ids, got.labels):
        if label != IGNORE_INDEX:
            assert label == tid
            run.append(tid)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert [tokenizer.decode(r) for r in runs] == [t for t, answer in parts if answer]


def test_chatml_pieces_and_tokens_are_exactly_the_answers(tokenizer):
    pieces = cut_pieces(TURNS, hf_render(tokenizer, CHATML))
    parts = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>\n", True),
        ("<|im_start|>user\nCall the map tool.<|im_end|>\n<|im_start|>assistant\n", False),
        ('{"name": "map", "arguments": {"city": "Paris"}}<|im_end|>\n', True),
        ('<|im_start|>tool\n{"ok": true}<|im_end|>\n<|im_start|>assistant\n', False),
        ("Done.<|im_end|>\n", True),
    ]  # fmt: skip
    assert merged(pieces) == parts
    got = tokenize_pieces(pieces, whole_text_encoder(tokenizer)(pieces), max_length=10_000)
    check_tokens(tokenizer, got, parts)  # token by token
    assert got.turns_kept == len(TURNS) and not got.truncated
    assert got.n_response_tokens == sum(1 for x in got.labels if x != IGNORE_INDEX) > 0


def test_an_answer_that_is_not_a_plain_suffix_of_the_prompt_is_cut_at_its_first_character(tokenizer):
    pieces = cut_pieces(TURNS[:3], hf_render(tokenizer, NOT_SUFFIX))
    parts = [
        ("<s><|system|>\nBe brief.</s>\n<|user|>\nCapital of France?</s>\n<|assistant|>", False),
        ("Paris.</s>\n", True),
    ]
    assert merged(pieces) == parts
    got = tokenize_pieces(pieces, whole_text_encoder(tokenizer)(pieces), max_length=10_000)
    check_tokens(tokenizer, got, parts)
    assert got.input_ids[0] == tokenizer.bos_token_id  # the template's BOS text is the BOS token


def test_tool_calls_are_trained_only_when_asked(tokenizer):
    pieces = cut_pieces(TURNS, hf_render(tokenizer, CHATML), train_tool_calls=False)
    answers = [text for text, answer in merged(pieces) if answer]
    assert answers == ["Paris.<|im_end|>\n", "Done.<|im_end|>\n"]


def test_truncation_drops_whole_trailing_turns_then_cuts_the_first_answer(tokenizer):
    pieces = cut_pieces(TURNS, hf_render(tokenizer, CHATML))
    tokens = whole_text_encoder(tokenizer)(pieces)
    full = tokenize_pieces(pieces, tokens, max_length=10_000)
    first_exchange = sum(1 for _, k in tokens if pieces[k].turn <= 2)  # system, user, answer
    answer = sum(1 for _, k in tokens if pieces[k].turn == 2 and pieces[k].answer)
    cut = tokenize_pieces(pieces, tokens, max_length=first_exchange + 3)  # turn 3 does not fit
    assert cut.turns_kept == 3 and cut.truncated
    assert (cut.input_ids, cut.labels) == (full.input_ids[:first_exchange], full.labels[:first_exchange])
    head = tokenize_pieces(pieces, tokens, max_length=first_exchange - answer + 2)  # 2 tokens of the answer fit
    assert head.turns_kept == 2 and head.n_response_tokens == 2
    assert head.input_ids == full.input_ids[: len(head.input_ids)]
    none = tokenize_pieces(pieces, tokens, max_length=5)  # not even the prompt fits: reported, never guessed
    assert none.n_response_tokens == 0 and len(none.input_ids) == 5


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    with pytest.raises(TemplateNotIncremental):
        cut_pieces(TURNS[:3], hf_render(tokenizer, REWRITES_HISTORY))


def test_the_real_glaive_conversations_train_on_their_answers_text_only(tokenizer):
    render, encode = hf_render(tokenizer, CHATML), whole_text_encoder(tokenizer)
    seen = 0
    for record in json.loads(GLAIVE.read_text()):
        turns, _ = canonical_turns(record)
        pieces = cut_pieces(turns, render)
        assert "".join(p.text for p in pieces) == render(turns_as_messages(turns), False)
        want = "".join(t["content"] + "<|im_end|>\n" for t in turns if t["role"] in ("assistant", "tool_call"))
        assert "".join(p.text for p in pieces if p.answer) == want
        got = tokenize_pieces(pieces, encode(pieces), max_length=100_000)
        check_tokens(tokenizer, got, [(p.text, p.answer) for p in merge_kinds(pieces)])
        seen += 1
    assert seen == 300


def turns_as_messages(turns):
    from gradfilter_ray.data.chat_tokens import template_messages

    return template_messages(turns)


def test_the_tokens_table_of_real_conversations_under_both_prompt_formats():
    """tokens/ rows of the glaive conversations as ingest writes them: under chat every row trains on its answers
    (the loss spans hold exactly the answer tokens, IFD's second sequence is BOS + those answers); under alpaca the
    multi-turn rows are counted as needing chat and trained on nowhere, and single exchanges are Alpaca rows."""
    import pyarrow as pa

    from gradfilter_ray.config import ProxyConfig
    from gradfilter_ray.data.formats import normalize_record
    from gradfilter_ray.data.tokenized import MULTI_TURN_NEEDS_CHAT, tokenize_table

    spec = ModelSpec(name_or_path="bundled:stories260K")
    tokenizer = load_tokenizer(spec)
    records = json.loads(GLAIVE.read_text())[:40]
    records.append({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]})
    rows = [normalize_record(r, 100_000) for r in records]
    table = pa.table(
        {
            "id": pa.array(range(len(rows)), pa.int64()),
            **{c: [r[c] for r in rows] for c in ("instruction", "input", "output", "conversation")},
        }
    )
    chat = tokenize_table(
        table, tokenizer, ProxyConfig(model=spec, max_length=4096, template="chat", chat_template=CHATML)
    )
    for row, canonical in zip(chat.to_pylist(), rows):
        turns = json.loads(canonical["conversation"])
        answers = "".join(t["content"] + "<|im_end|>\n" for t in turns if t["role"] in ("assistant", "tool_call"))
        spans = row["loss_spans"]
        labelled = [tid for lo, hi in zip(spans[0::2], spans[1::2]) for tid in row["input_ids"][lo:hi]]
        assert row["skip_reason"] is None and tokenizer.decode(labelled) == answers
        assert row["n_response_tokens"] == len(labelled)
        assert row["response_input_ids"] == [tokenizer.bos_token_id] + labelled and row["response_label_start"] == 1
    alpaca = tokenize_table(table, tokenizer, ProxyConfig(model=spec, max_length=4096)).to_pylist()
    multi = [r for r, c in zip(alpaca, rows) if len(json.loads(c["conversation"])) > 2]
    assert multi and all(r["skip_reason"] == MULTI_TURN_NEEDS_CHAT and r["n_response_tokens"] == 0 for r in multi)
    single = alpaca[-1]
    assert single["skip_reason"] is None and single["n_response_tokens"] > 0
    assert single["loss_spans"] == [single["label_start"], single["n_tokens"]]


def test_a_chat_target_is_asked_exactly_as_it_was_trained(tokenizer):
    """Evaluation's prompt for a chat target (one user turn with the generation prompt, tokenised whole) is the
    training row's context token for token, and the training labels start right where the prompt ends."""
    from gradfilter_ray.data.tokenized import as_turns, chat_tokenize
    from gradfilter_ray.evaluation.generate import prompt_token_ids

    tokenizer.chat_template = CHATML
    try:
        prompt = prompt_token_ids(tokenizer, ["Name a colour."], ["Sky"], 1000, "chat")[0]
        trained = chat_tokenize(tokenizer, as_turns("Name a colour.", "Sky", "Blue.", None), 1000)
    finally:
        tokenizer.chat_template = None
    assert trained.input_ids[: len(prompt)] == prompt
    assert (
        trained.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and trained.labels[len(prompt)] != IGNORE_INDEX
    )
    assert tokenizer.decode(trained.input_ids[len(prompt) :]) == "Blue.<|im_end|>\n"


def test_a_template_with_no_generation_prompt_still_never_trains_the_role_header(tokenizer):
    no_prompt = CHATML.split("{% if add_generation_prompt %}")[0]
    answers = [text for text, answer in merged(cut_pieces(TURNS[:3], hf_render(tokenizer, no_prompt))) if answer]
    assert answers == ["Paris.<|im_end|>\n"]


def test_a_conversation_the_template_refuses_is_counted_and_the_others_go_on(tokenizer):
    """Jinja's raise_exception (templates that refuse tool turns, or roles that do not alternate) marks that row
    chat_template_error; the rest of the batch is tokenised. No template at all stops the stage."""
    import pyarrow as pa

    from gradfilter_ray.config import ProxyConfig
    from gradfilter_ray.data.tokenized import CHAT_TEMPLATE_ERROR, tokenize_table

    no_tools = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        "{% endfor %}"
    )
    spec = ModelSpec(name_or_path="bundled:stories260K")
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "instruction": ["q", "q"],
            "input": ["", ""],
            "output": ["a", "a"],
            "conversation": [json.dumps(TURNS), json.dumps(TURNS[:3])],
        }
    )
    fmt = ProxyConfig(model=spec, max_length=512, template="chat", chat_template=no_tools + CHATML)
    rows = tokenize_table(table, tokenizer, fmt).to_pylist()
    assert rows[0]["skip_reason"] == CHAT_TEMPLATE_ERROR and rows[0]["n_response_tokens"] == 0
    assert rows[1]["skip_reason"] is None and rows[1]["n_response_tokens"] > 0
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_table(table, tokenizer, ProxyConfig(model=spec, max_length=512, template="chat"))


def test_a_chat_answer_is_cut_at_its_end_of_turn_text(tokenizer):
    """A config template on a base model writes its end of turn as plain text: decoding cuts the answer there."""
    from gradfilter_ray.evaluation.generate import decode_answers, end_of_turn_text

    tokenizer.chat_template = CHATML
    try:
        assert end_of_turn_text(tokenizer) == "<|im_end|>"
        ids = tokenizer(["Blue.<|im_end|>\n<|im_start|>user\nmore"], add_special_tokens=False)["input_ids"]
        assert decode_answers(tokenizer, ids, "chat") == ["Blue."]
        assert decode_answers(tokenizer, ids)[0].startswith("Blue.<|im_end|>")  # Alpaca targets: untouched
    finally:
        tokenizer.chat_template = None


def test_tools_are_written_as_context_and_never_trained(tokenizer):
    """The glaive conversations as ingest writes them, tokenised under a template that writes tools: the rendering
    holds every listed function's definition before the first turn, and the loss still covers exactly the answers
    (the same labelled tokens as without the tools); a template that ignores tools is detected."""
    import pyarrow as pa

    from gradfilter_ray.config import ProxyConfig
    from gradfilter_ray.data.chat_tokens import renders_tools
    from gradfilter_ray.data.formats import normalize_record
    from gradfilter_ray.data.tokenized import tokenize_table

    assert renders_tools(tokenizer, CHATML_TOOLS) and not renders_tools(tokenizer, CHATML)
    rows = [normalize_record(r, 100_000) for r in json.loads(GLAIVE.read_text())[:40]]
    assert sum(r["tools"] is not None for r in rows) > 10
    columns = ("instruction", "input", "output", "conversation", "tools")
    table = pa.table({"id": pa.array(range(len(rows)), pa.int64()), **{c: [r[c] for r in rows] for c in columns}})
    spec = ModelSpec(name_or_path="bundled:stories260K")
    proxy = ProxyConfig(model=spec, max_length=100_000, template="chat", chat_template=CHATML_TOOLS)
    with_tools = tokenize_table(table, tokenizer, proxy).to_pylist()
    without = tokenize_table(table.drop_columns(["tools"]), tokenizer, proxy).to_pylist()
    for row, bare, canonical in zip(with_tools, without, rows):
        text = tokenizer.decode(row["input_ids"])
        spans = row["loss_spans"]
        labelled = [tid for lo, hi in zip(spans[0::2], spans[1::2]) for tid in row["input_ids"][lo:hi]]
        bare_spans = bare["loss_spans"]
        assert labelled == [t for lo, hi in zip(bare_spans[0::2], bare_spans[1::2]) for t in bare["input_ids"][lo:hi]]
        if canonical["tools"] is None:
            assert row["input_ids"] == bare["input_ids"]
            continue
        header = "<|im_start|>system\nFunctions:\n" + json.dumps(json.loads(canonical["tools"])) + "<|im_end|>"
        assert text.startswith(header) and spans[0] > len(tokenizer(header, add_special_tokens=False)["input_ids"])
        assert len(row["input_ids"]) > len(bare["input_ids"])


@pytest.mark.parametrize(
    "template, chat_template, renders",
    [
        ("chat", CHATML_TOOLS, True),
        ("chat", CHATML, False),  # rows listing tools train without them: the tokens record says so
        ("alpaca", None, False),  # the Alpaca prompt has no place for tools
        ("chat", "{{ raise_exception('no tools here') }}", None),  # the probe refused: unknown, the stage goes on
    ],
)
def test_the_tokens_record_says_whether_the_template_writes_tools(template, chat_template, renders):
    from gradfilter_ray.config import ProxyConfig
    from gradfilter_ray.data.tokens_stage import template_renders_tools

    spec = ModelSpec(name_or_path="bundled:stories260K")
    proxy = ProxyConfig(model=spec, template=template, chat_template=chat_template)
    assert template_renders_tools(proxy) is renders
