"""Pure core: a canonical conversation -> token ids and labels through a chat template, the loss on every answer turn
(assistant, and tool_call when asked) and on nothing else, exact by construction.

The template (the tokenizer's own, or one given in the config) renders text; this module cuts that text into pieces,
each either context or answer, tokenises the text whole (as the model reads it) and gives every token the piece its
characters lie in, so the label mask follows the text exactly; a token that would span context and answer is an
error, never a guess. The cuts come from rendering the conversation's prefixes: the text a prefix
adds is its last turn's; for an answer turn, the prefix rendered with the generation prompt marks where the answer
starts (their longest common prefix, so a template whose generation prompt differs from how it renders a finished
answer turn, e.g. "<|assistant|>\\n" as a prompt but "<|assistant|>" before an answer, still cuts at the answer's
first character). The answer piece runs to the end of its turn, end-of-turn marker included (what the model must
learn to emit). A template that rewrites earlier turns when later ones are added cannot be cut this way: it raises
`TemplateNotIncremental`, never a silently wrong mask.

Truncation drops whole trailing turns first; only when even the first answer does not fit is that answer's tail cut.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from gradfilter_ray.data.conversations import ASSISTANT, TOOL_CALL
from gradfilter_ray.losses import IGNORE_INDEX

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text


class TemplateNotIncremental(ValueError):
    """The template renders a conversation's prefix differently inside the whole conversation."""


def template_errors() -> tuple[type[Exception], ...]:
    """What a row can raise that only that row's conversation is to blame for: a template that cannot be cut, a
    token across a border, or the template refusing the conversation (Jinja's raise_exception: roles that do not
    alternate, a system turn it does not take, an unknown role)."""
    from jinja2 import TemplateError

    return (TemplateNotIncremental, TokenStraddlesPieces, TemplateError)


@dataclass(frozen=True)
class Piece:
    text: str
    answer: bool  # trained on
    turn: int  # the turn it belongs to


@dataclass(frozen=True)
class ChatTokenized:
    input_ids: list[int]
    labels: list[int]
    n_response_tokens: int
    turns_kept: int  # whole turns that fit max_length
    truncated: bool


def trained_roles(train_tool_calls: bool) -> tuple[str, ...]:
    return (ASSISTANT, TOOL_CALL) if train_tool_calls else (ASSISTANT,)


def template_messages(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Canonical turns as chat-template messages: a tool call is the assistant speaking (its content the call's
    JSON); every other role keeps its name."""
    return [{"role": "assistant" if t["role"] == TOOL_CALL else t["role"], "content": t["content"]} for t in turns]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cut_pieces(turns: list[dict[str, str]], render: Render, train_tool_calls: bool = True) -> list[Piece]:
    """The rendered conversation as consecutive pieces (their texts concatenate to the whole rendering)."""
    messages = template_messages(turns)
    answers = trained_roles(train_tool_calls)
    pieces: list[Piece] = []
    done = ""
    for k, turn in enumerate(turns):
        after = render(messages[: k + 1], False)
        if not after.startswith(done):
            raise TemplateNotIncremental(f"turn {k}: rendering {k + 1} turns does not extend the first {k}")
        start = len(done)
        if turn["role"] in answers:
            # The answer starts at its own text where the template writes it verbatim (so a role header is never
            # trained, whatever the generation prompt); else where the prompt with its generation prompt stops
            # agreeing with the finished turn (a template that trims or reformats the text).
            at = after.rfind(turn["content"], start)  # the rightmost: a header may contain the same word
            if at >= 0:
                start = at
            else:
                prompt = render(messages[:k], True) if k else ""
                start = max(start, _common_prefix(prompt, after))
        if start > len(done):
            pieces.append(Piece(after[len(done) : start], False, k))
        if len(after) > start:
            pieces.append(Piece(after[start:], turn["role"] in answers, k))
        done = after
    return pieces


def tokenize_pieces(pieces: list[Piece], tokens: list[tuple[int, int]], max_length: int) -> ChatTokenized:
    """`tokens` = (token id, index of its piece) for the whole rendering (`whole_text_encoder`); labels are the ids of
    answer pieces' tokens. Whole trailing turns are dropped until the rest fits max_length; if no whole turn with an
    answer fits, the token stream is cut at max_length (keeping the first answer's head when its prompt fits)."""
    n_turns = 1 + max((p.turn for p in pieces), default=-1)
    ends = [0] * n_turns  # tokens up to the end of each turn
    for position, (_, k) in enumerate(tokens):
        ends[pieces[k].turn] = position + 1
    for t in range(1, n_turns):  # a turn that got no token of its own ends where the one before it ends
        ends[t] = max(ends[t], ends[t - 1])
    kept_turns = sum(1 for end in ends if end <= max_length)  # ends only grow: these are the leading turns
    answered = any(p.answer and p.turn < kept_turns for p in pieces)
    stop = ends[kept_turns - 1] if answered else min(max_length, len(tokens))
    input_ids = [tid for tid, _ in tokens[:stop]]
    labels = [tid if pieces[k].answer else IGNORE_INDEX for tid, k in tokens[:stop]]
    if labels and labels[0] != IGNORE_INDEX:
        labels[0] = IGNORE_INDEX  # a first token with no context is never predicted (labels shift by one)
    return ChatTokenized(
        input_ids=input_ids,
        labels=labels,
        n_response_tokens=sum(1 for label in labels if label != IGNORE_INDEX),
        turns_kept=kept_turns,
        truncated=kept_turns < n_turns,
    )


class TokenStraddlesPieces(ValueError):
    """A token of the whole rendering spans the border between context and an answer: no exact mask exists."""


def whole_text_encoder(tokenizer) -> Callable[[list[Piece]], list[tuple[int, int]]]:
    """The rendering tokenised whole, as the model reads it at inference (piece by piece would tokenise the borders
    differently, e.g. a SentencePiece word-start marker before every answer), each token assigned to the piece
    holding its last character; a token that spans context and answer raises TokenStraddlesPieces."""

    def encode(pieces: list[Piece]) -> list[tuple[int, int]]:
        starts = list(itertools.accumulate((len(p.text) for p in pieces), initial=0))
        text = "".join(p.text for p in pieces)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        last = len(pieces) - 1
        for tid, (first, stop) in zip(enc["input_ids"], enc["offset_mapping"]):
            j = min(bisect.bisect_right(starts, first) - 1, last)
            k = min(bisect.bisect_right(starts, max(first, stop - 1)) - 1, last)
            if len({pieces[i].answer for i in range(j, k + 1)}) > 1:
                raise TokenStraddlesPieces(f"token {text[first:stop]!r} spans pieces {j} to {k}")
            out.append((tid, k))
        return out

    return encode


def hf_render(tokenizer, chat_template: str | None = None, tools: list[dict] | None = None) -> Render:
    """Rendering through the tokenizer's chat template, or `chat_template` (Jinja) for tokenizers without one, with
    the functions the conversation may call (`tools`) where the template writes them (context: never trained)."""

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    return render


PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "", "parameters": {}}}


def renders_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the template writes a conversation's tools at all (many do not: their rows train without them)."""
    messages = [{"role": "user", "content": "hello"}]
    return "probe_tool_7f3a" in hf_render(tokenizer, chat_template, [PROBE_TOOL])(messages, False)
