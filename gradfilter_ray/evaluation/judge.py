"""LLM-as-judge pairwise rating through any OpenAI-compatible chat-completions endpoint, standard library only.

The prompt is the one Cherry_LLM, Superfiltering and AlpaGasus use (from Vicuna's evaluation), so PWS numbers are
comparable with theirs. The client never raises for a failed request: one bad pair must not end a run of thousands,
so failures come back as a result with `error` set and are counted as invalid comparisons.
The API key is kept out of every message, log line, repr and cache entry; error bodies are scrubbed of it because
some providers echo the key they rejected.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradfilter_ray.evaluation import pws

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
USER_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives "
    "an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive "
    "explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses "
    "were presented does not affect your judgment.\n\n"
)

# What a judged pair's key takes of the prompt: the prompt's text, the request's sampling, and the both-orders rule
# (pws.outcome; bump RULE_VERSION when it changes). A pair judged under another prompt is judged again.
TEMPERATURE, MAX_TOKENS, RULE_VERSION = 0.0, 512, 1
JUDGE_PROMPT = hashlib.sha256(
    json.dumps([SYSTEM_PROMPT, USER_TEMPLATE, TEMPERATURE, MAX_TOKENS, RULE_VERSION]).encode("utf-8")
).hexdigest()[:16]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OUT_OF_TEN = re.compile(r"\s*/\s*10(?![\d.])")  # "8/10": the denominator is not a score


def build_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to score assistant 1 and assistant 2."""
    user = USER_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """The two scores on the reply's first non-blank line, or None.

    The prompt asks for exactly "s1 s2" on the first line; we also accept commas and "8/10"-style scores, but the
    line must hold exactly two numbers, each in [0, 10]. Anything else is None rather than a guess.
    """
    if not reply or not reply.strip():
        return None
    first = _OUT_OF_TEN.sub("", reply.strip().splitlines()[0])
    numbers = _NUMBER.findall(first)
    if len(numbers) != 2:
        return None
    a, b = float(numbers[0]), float(numbers[1])
    if not (0.0 <= a <= 10.0 and 0.0 <= b <= 10.0):
        return None
    return (a, b)


def chat_completions_url(base_url: str) -> str:
    """`{base_url}/chat/completions`; a bare host gets the conventional `/v1` (OpenAI, vLLM, Ollama serve there)."""
    url = base_url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("base_url must be an absolute http(s) URL, e.g. http://localhost:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/v1" if not parts.path else "") + "/chat/completions"


@dataclass(frozen=True)
class JudgeResult:
    """One rating: `scores` is None when the reply was unparseable or the request failed (`error` says why)."""

    scores: tuple[float, float] | None
    reply: str | None
    cached: bool
    attempts: int
    error: str | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would re-send the Authorization header to wherever a redirect points; refuse to follow instead.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


class JudgeClient:
    """Rates answer pairs with an OpenAI-compatible judge, retrying transient failures and caching replies.

    Up to `1 + max_retries` attempts per rating. HTTP 429, 5xx, timeouts and connection errors are retried after
    `backoff_s * 2**(n-1)` seconds, or the server's `Retry-After` (seconds), both capped at `max_wait_s`; other
    4xx are final. With `cache_path`, replies go to an append-only JSONL keyed by sha256 of (model, messages,
    temperature, max_tokens), so a re-run reads them back without HTTP calls. Thread-safe.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float = 60,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        cache_path: Path | None = None,
        temperature: float = TEMPERATURE,
        max_tokens: int = MAX_TOKENS,
        sleep: Callable[[float], None] = time.sleep,
        max_wait_s: float = 60.0,
    ) -> None:
        self.url = chat_completions_url(base_url)
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        self._load_cache()

    def __repr__(self) -> str:
        key = "'***'" if self._api_key else "None"
        return f"JudgeClient(url={self.url!r}, model={self.model!r}, api_key={key}, cache_path={self.cache_path!r})"

    def rate(self, question: str, answer_1: str, answer_2: str) -> JudgeResult:
        """Ask the judge to score (answer_1, answer_2) for `question`; never raises for request failures."""
        messages = build_messages(question, answer_1, answer_2)
        key = self._cache_key(messages)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return JudgeResult(parse_scores(hit), hit, cached=True, attempts=0, error=None)
        reply, attempts, error = self._post(messages)
        if reply is not None:
            self._remember(key, reply)  # unparseable replies too: they are the judge's real answer
        scores = parse_scores(reply) if reply is not None else None
        return JudgeResult(scores, reply, cached=False, attempts=attempts, error=error)

    # -- HTTP -------------------------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _request(self, messages: list[dict[str, str]]) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")

    def _post(self, messages: list[dict[str, str]]) -> tuple[str | None, int, str | None]:
        """(reply, attempts, error): reply is None exactly when error is set."""
        request = self._request(messages)
        attempts = 0
        while True:
            attempts += 1
            retry_after: float | None = None
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _content(payload), attempts, None
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {_body_snippet(e)}"
                if e.code != 429 and e.code < 500:
                    break
                retry_after = _retry_after(e.headers)
            except ValueError as e:  # a 200 without a chat completion: the server is not what we think, don't retry
                error = f"malformed response: {e}"
                break
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused/reset connections
                error = f"{type(e).__name__}: {e}"
            if attempts > self.max_retries:
                break
            delay = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempts - 1)
            delay = min(max(delay, 0.0), self.max_wait_s)
            logger.warning(
                "judge request attempt %d/%d failed (%s); retrying in %.1fs",
                attempts,
                self.max_retries + 1,
                self._redact(error),
                delay,
            )
            self._sleep(delay)
        error = self._redact(error)
        logger.warning("judge request gave up after %d attempt(s): %s", attempts, error)
        return None, attempts, error

    # -- cache ------------------------------------------------------------------------------------------------------

    def _cache_key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            },
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.exists():
            return
        with open(self.cache_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    key, reply = entry["key"], entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue  # a crash mid-write leaves a truncated last line: lose that one entry, keep the rest
                if isinstance(key, str) and isinstance(reply, str):
                    self._cache[key] = reply

    def _remember(self, key: str, reply: str) -> None:
        with self._lock:
            self._cache[key] = reply
            if self.cache_path is None:
                return
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "model": self.model, "reply": reply}, ensure_ascii=False) + "\n"
            with open(self.cache_path, "a+b") as f:
                # After a torn write the file ends mid-line; start on a fresh line so this entry stays readable.
                if f.seek(0, 2) > 0:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()


def _content(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content in the response") from None
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not text")
    return content


def _body_snippet(e: urllib.error.HTTPError, limit: int = 300) -> str:
    try:
        return e.read()[:limit].decode("utf-8", errors="replace").strip() or str(e.reason)
    except (OSError, http.client.HTTPException):
        return str(e.reason)
    finally:
        e.close()


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
    return seconds if seconds is not None and seconds >= 0 else None


def judge_both_orders(client: JudgeClient, question: str, answer_a: str, answer_b: str) -> tuple[str, bool]:
    """(outcome, answered): the outcome of `judge_pair`, and whether the judge replied in both orders (False when a
    request failed: the outcome is then "invalid" for want of a reply, not by the judge's word)."""
    a_first = client.rate(question, answer_a, answer_b)
    a_second = client.rate(question, answer_b, answer_a)
    answered = a_first.error is None and a_second.error is None
    return pws.outcome(a_first.scores, a_second.scores), answered


def judge_pair(client: JudgeClient, question: str, answer_a: str, answer_b: str) -> str:
    """ "win"/"tie"/"lose" for answer A against B by the both-orders rule (see pws.outcome), or "invalid" when
    either order's reply was unparseable or its request failed."""
    return judge_both_orders(client, question, answer_a, answer_b)[0]
