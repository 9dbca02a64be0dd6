"""JudgeClient against a real local HTTP server that plays scripted OpenAI-style replies and failures."""

import logging
import socket

import pytest
from conftest import HANG, ChatServer, status
from conftest import reply as ok

from gradfilter_ray.evaluation.judge import (
    JudgeClient,
    build_messages,
    chat_completions_url,
    judge_both_orders,
    judge_pair,
    parse_scores,
)

KEY = "sk-TEST-leak-canary-7f3a9c21e5"


class ScriptedServer(ChatServer):
    """Answers each POST with the next scripted action and records what it received."""

    def __init__(self):
        self.script: list[tuple] = []
        super().__init__(lambda body: self.script.pop(0) if self.script else status(418, "script exhausted"))


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def make_client(server, sleeps):
    def make(**overrides):
        defaults = {"base_url": server.url + "/v1", "model": "judge-model", "api_key": KEY, "timeout_s": 5}
        defaults.update(max_retries=3, backoff_s=0.5, sleep=sleeps.append)  # no real waiting in tests
        return JudgeClient(**{**defaults, **overrides})

    return make


def test_prompt_is_the_standard_one():
    system, user = build_messages("Q?", "A1", "A2")
    assert system == {
        "role": "system",
        "content": "You are a helpful and precise assistant for checking the quality of the answer.",
    }
    assert user["role"] == "user"
    assert user["content"].startswith(
        "[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\nA1\n\n[The End of Assistant 1's Answer]\n\n"
        "[The Start of Assistant 2's Answer]\nA2\n\n[The End of Assistant 2's Answer]\n\n[System]\nWe would like"
    )
    assert user["content"].endswith("does not affect your judgment.\n\n")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("8 7", (8.0, 7.0)),
        ("8, 7\nexplanation 1 2 3", (8.0, 7.0)),
        ("8/10 7/10", (8.0, 7.0)),
        ("\n  9 6\nbecause", (9.0, 6.0)),
        ("8.5 7", (8.5, 7.0)),
        ("10 0", (10.0, 0.0)),
        ("Assistant 1: 8, Assistant 2: 7", None),  # four numbers: ambiguous, not guessed
        ("11 3", None),
        ("7 8 9", None),
        ("8", None),
        ("Good answers.\n8 7", None),  # only the first line counts
        ("I cannot decide.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_url_forms():
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/api/v1") == "http://h:1/api/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError):
        chat_completions_url("h:1/v1")


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_request_reaches_server(server, make_client, suffix):
    server.script = [ok("8 7\nBoth fine.")]
    result = make_client(base_url=server.url + suffix).rate("Why is the sky blue?", "Rayleigh.", "Magic.")
    expected = ((8.0, 7.0), "8 7\nBoth fine.", False, 1, None)
    assert (result.scores, result.reply, result.cached, result.attempts, result.error) == expected
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "judge-model"
    assert body["messages"] == build_messages("Why is the sky blue?", "Rayleigh.", "Magic.")
    assert (body["temperature"], body["max_tokens"]) == (0.0, 512)


def test_no_key_sends_no_authorization(server, make_client):
    server.script = [ok("5 5")]
    make_client(api_key=None).rate("q", "a", "b")
    assert "Authorization" not in server.requests[0]["headers"]


def test_unparseable_reply_is_an_answer_not_an_error(server, make_client, tmp_path):
    server.script = [ok("Both are fine, I think.")]
    result = make_client(cache_path=tmp_path / "c.jsonl").rate("q", "a", "b")
    assert (result.scores, result.reply, result.error, result.attempts) == (None, "Both are fine, I think.", None, 1)
    assert "Both are fine" in (tmp_path / "c.jsonl").read_text()


def test_429_honours_retry_after(server, make_client, sleeps):
    server.script = [status(429, "slow down", {"Retry-After": "0"}), ok("9 4")]
    result = make_client().rate("q", "a", "b")
    assert (result.scores, result.attempts, result.error) == ((9.0, 4.0), 2, None)
    assert sleeps == [0.0]


def test_retry_after_is_capped(server, make_client, sleeps):
    server.script = [status(429, "", {"Retry-After": "3600"}), ok("9 4")]
    assert make_client(max_wait_s=2.0).rate("q", "a", "b").attempts == 2
    assert sleeps == [2.0]


def test_5xx_retried_with_exponential_backoff(server, make_client, sleeps):
    server.script = [status(500, "oops"), status(503, "busy"), ok("3 6")]
    result = make_client().rate("q", "a", "b")
    assert (result.scores, result.attempts, result.error) == ((3.0, 6.0), 3, None)
    assert sleeps == [0.5, 1.0]


def test_401_is_not_retried(server, make_client, sleeps):
    server.script = [status(401, "invalid api key"), ok("should not be asked")]
    result = make_client().rate("q", "a", "b")
    assert (result.scores, result.reply, result.attempts) == (None, None, 1)
    assert "401" in result.error and "invalid api key" in result.error
    assert len(server.requests) == 1 and sleeps == []


def test_exhausted_retries_return_an_error_and_cache_nothing(server, make_client, sleeps, tmp_path):
    server.script = [status(500, "down")] * 4
    cache = tmp_path / "c.jsonl"
    result = make_client(cache_path=cache).rate("q", "a", "b")
    assert (result.scores, result.attempts) == (None, 4)
    assert result.error.startswith("HTTP 500")
    assert len(sleeps) == 3 and not cache.exists()


def test_timeout_is_retried_then_reported(server, make_client):
    server.script = [HANG, HANG]
    result = make_client(timeout_s=0.2, max_retries=1).rate("q", "a", "b")
    assert (result.scores, result.attempts) == (None, 2)
    assert "timed out" in result.error
    assert len(server.requests) == 2


def test_connection_refused_is_retried_then_reported(make_client, sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nothing listens there
    result = make_client(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2).rate("q", "a", "b")
    assert (result.scores, result.attempts) == (None, 3)
    assert result.error and len(sleeps) == 2


def test_cache_replays_without_http(server, make_client, tmp_path):
    cache = tmp_path / "judge" / "cache.jsonl"
    server.script = [ok("8 6"), ok("no scores here")]
    first = make_client(cache_path=cache)
    assert first.rate("q", "a", "b").scores == (8.0, 6.0)
    assert first.rate("q", "b", "a").scores is None
    assert len(server.requests) == 2

    second = make_client(cache_path=cache)
    again = [second.rate("q", "a", "b"), second.rate("q", "b", "a")]
    assert [(r.scores, r.reply, r.cached, r.attempts) for r in again] == [
        ((8.0, 6.0), "8 6", True, 0),
        (None, "no scores here", True, 0),
    ]
    assert len(server.requests) == 2  # zero HTTP calls on the re-run

    server.script = [ok("7 7")]  # a different temperature is a different question to the judge
    assert make_client(cache_path=cache, temperature=0.7).rate("q", "a", "b").cached is False
    assert len(server.requests) == 3


def test_cache_survives_a_truncated_last_line(server, make_client, tmp_path):
    cache = tmp_path / "cache.jsonl"
    server.script = [ok("8 6"), ok("2 9")]
    make_client(cache_path=cache).rate("q", "a", "b")
    with open(cache, "a") as f:
        f.write('{"key": "0123", "rep')  # a crash mid-write
    client = make_client(cache_path=cache)
    assert client.rate("q", "a", "b").cached is True
    assert client.rate("q", "c", "d").scores == (2.0, 9.0)
    third = make_client(cache_path=cache)
    assert [third.rate("q", "a", "b").cached, third.rate("q", "c", "d").cached] == [True, True]
    assert len(server.requests) == 2


def test_api_key_never_leaks(server, make_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache.jsonl"
    echo = f"Incorrect API key provided: {KEY}"  # some providers echo the rejected key back
    server.script = [status(500, echo), ok("8 6"), status(401, echo)]
    client = make_client(cache_path=cache)
    results = [client.rate("q", "a", "b"), client.rate("q", "x", "y")]
    assert results[0].scores == (8.0, 6.0)
    assert results[1].error and "***" in results[1].error
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # it was really used
    assert "***" in caplog.text  # the retry of the echoing 500 was logged, scrubbed
    for text in [cache.read_text(), repr(client), str(client), caplog.text, *(r.error or "" for r in results)]:
        assert KEY not in text


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ([ok("8 6"), ok("5 9")], "win"),
        ([ok("8 6"), ok("7 7")], "win"),
        ([ok("6 8"), ok("9 5")], "lose"),
        ([ok("8 6"), ok("8 6")], "tie"),
        ([ok("8 6"), ok("I refuse")], "invalid"),
        ([ok("8 6"), status(400, "bad request")], "invalid"),
    ],
)
def test_judge_pair(server, make_client, script, expected):
    server.script = list(script)
    assert judge_pair(make_client(), "q", "answer A", "answer B") == expected
    first, second = (r["body"]["messages"][1]["content"] for r in server.requests)
    assert first.index("answer A") < first.index("answer B")  # A is assistant 1 in the first order
    assert second.index("answer B") < second.index("answer A")


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ([ok("8 6"), ok("5 9")], ("win", True)),
        ([ok("8 6"), ok("I refuse")], ("invalid", True)),  # the judge's own word: kept
        ([ok("8 6"), status(400, "bad request")], ("invalid", False)),  # no reply: asked again by a later run
    ],
)
def test_both_orders_say_whether_the_judge_replied_to_both(server, make_client, script, expected):
    server.script = list(script)
    assert judge_both_orders(make_client(), "q", "answer A", "answer B") == expected
