"""Tiers 2 and 3: an OpenAI-compatible chat endpoint called through the `openai` client.

One request per (query, product text): the versioned prompt, JSON output (grade first, then reason)
constrained by `response_format` (a JSON schema whose grade is an enum of the scale; `json_schema` for
OpenAI / vLLM, llama.cpp's `json_object` + schema for the local server, or none). The grade
distribution comes from the grade token's log-probabilities: the top alternatives at that position
that are grade tokens, their probabilities summed per grade (" 4" and "4" are one grade) and
normalised over the grades; the tier reports it (`probs`), its expected grade and the confidence
P(grade). An endpoint that returns no log-probabilities (or none at the grade token) gives
`fallback_confidence` (marked `confidence_source: fallback`) and no distribution; the combiner then
spreads the rest of the mass evenly over the other grades.
Transient failures (429, 5xx, timeouts, connection errors) are retried with exponential backoff
and full jitter, honouring `Retry-After` / `retry-after-ms`; malformed or truncated answers are
retried too, and after `max_attempts` the pair gets an error result, never an exception.
A 401/403 (the key is refused) is not retried: the tier marks the result `fatal` and answers every
later pair at once with the same error, without a request, so the job can stop. Error texts are
redacted (the key, bearer tokens, `sk-...` strings) before they leave the tier. At most
`concurrency` requests are open at once: that many workers, each sending one request at a time; a pair
that backs off waits in a timer queue, not in a worker, so the slots stay busy while any pair is ready.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

from annomine.errors import EndpointError
from annomine.judges.config import LLMTierConfig
from annomine.judges.prompt import MalformedAnswer, build_messages, parse_answer
from annomine.judges.response_cache import answer_of, prompt_chars, response_key

log = logging.getLogger(__name__)

LOOPBACK_KEY = "loopback-no-key"
AUTH_STATUSES = (401, 403)
_SECRET_PATTERNS = [
    (re.compile(r"(?i)\bbearer\s+[^\s'\",}]+"), "Bearer ***"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-*]{4,}"), "sk-***"),
    (re.compile(r"(?i)\b(api[_-]?key[\"']?\s*[:=]\s*[\"']?)[^\s'\",}]+"), r"\1***"),
]


def redact(text: str | None, *secrets: str | None) -> str | None:
    """`text` without the given secrets, bearer tokens, `sk-...` keys or `api_key=...` values."""
    if not text:
        return text
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


@dataclass
class TierResult:
    grade: int | None = None
    raw_confidence: float | None = None
    confidence: float | None = None  # calibrated
    confidence_source: str | None = None
    probs: dict | None = None
    expected_grade: float | None = None
    reason: str | None = None
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error: str | None = None
    sure: bool = False
    # The endpoint refused the key (401/403): the job must stop, not record a failed pair.
    fatal: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None and not (k == "fatal" and not v)}
        d.update(self.extra)
        return d


def is_loopback(url: str | None) -> bool:
    return bool(url) and any(h in url for h in ("://127.0.0.1", "://localhost", "://[::1]"))


def resolve_api_key(cfg: LLMTierConfig, base_url: str | None) -> str:
    """The key from the env var named in the config, or a Databricks secret scope; never logged."""
    if cfg.api_key_env:
        value = os.environ.get(cfg.api_key_env)
        if value:
            return value
    if cfg.secret_scope and cfg.secret_key:
        try:  # Databricks: dbutils on the driver
            from pyspark.dbutils import DBUtils  # type: ignore
            from pyspark.sql import SparkSession

            return DBUtils(SparkSession.getActiveSession()).secrets.get(cfg.secret_scope, cfg.secret_key)
        except Exception as exc:  # noqa: BLE001
            raise EndpointError(f"tier {cfg.model} ({base_url}): cannot read secret {cfg.secret_scope}/{cfg.secret_key}: "
                                f"{type(exc).__name__}") from None
    if is_loopback(base_url):
        return LOOPBACK_KEY
    where = f"environment variable {cfg.api_key_env}" if cfg.api_key_env else "api_key_env / secret_scope (none configured)"
    raise EndpointError(f"tier {cfg.model} ({base_url}): no API key: {where} is not set")


def _retry_after_seconds(exc) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def post_chat_completion(client, body: dict):
    """POST `body` to `/chat/completions` through the client's own request path (base URL, auth, timeout, the
    SDK's typed errors) and read the answer as plain JSON, attributes as in the SDK's objects. The typed
    `chat.completions.create` spends ~1.6 of its ~3 ms of CPU a request transforming the parameters and building
    pydantic objects (docs/benchmarks.md, issue 20); with 16 workers sharing the GIL that kept slots idle.
    The SDK documents `client.post(..., cast_to=httpx2.Response)` for exactly this."""
    try:
        import httpx2 as httpx  # the openai SDK's HTTP library from openai 3
    except ImportError:  # pragma: no cover - older SDKs
        import httpx

    response = client.post("/chat/completions", body=body, cast_to=httpx.Response)
    try:
        answer = response.json(object_hook=lambda d: SimpleNamespace(**d))
    except ValueError:
        raise MalformedAnswer("response is not a chat completion") from None
    if not isinstance(answer, SimpleNamespace) or not getattr(answer, "choices", None):
        raise MalformedAnswer("response is not a chat completion")
    return answer


def read_completion(resp, result: TierResult, grades: list[int], fallback_confidence: float) -> TierResult:
    """Fill `result` from a chat completion (attributes as in the SDK's objects): tokens, grade, reason, the grade
    distribution from the log-probabilities (or the fallback confidence). Raises MalformedAnswer for an answer that
    is cut off or not the grade JSON."""
    usage = getattr(resp, "usage", None)
    if usage is not None:
        result.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
        result.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedAnswer("response is not a chat completion")
    choice = choices[0]
    if getattr(choice, "finish_reason", None) == "length":
        raise MalformedAnswer("answer truncated (finish_reason=length)")
    grade, reason = parse_answer(choice.message.content, grades)
    conf, probs = logprob_confidence(choice, grade, grades)
    result.grade, result.reason, result.probs = grade, reason, probs
    result.expected_grade = expected_grade(probs)
    if conf is None:
        result.raw_confidence, result.confidence_source = fallback_confidence, "fallback"
    else:
        result.raw_confidence, result.confidence_source = conf, "logprobs"
    result.error = None
    return result


def _grade_token(token: str, wanted: set[str]) -> str | None:
    t = (token or "").strip().strip('"')
    return t if t in wanted else None


def logprob_confidence(choice, grade: int, grades: list[int]) -> tuple[float | None, dict | None]:
    """(P(grade), distribution over the grades) at the grade token's position, from the answer's log-probs.

    The grade token is the first token after the `grade` key that is a grade (with or without a leading
    space or quote). The alternatives there that are grade tokens are summed per grade and normalised
    over the grades; grades absent from the top alternatives get probability 0. None, None when the
    endpoint returned no log-probabilities or the grade token is not among them."""
    logprobs = getattr(choice, "logprobs", None)
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return None, None
    wanted = {str(g) for g in grades}
    seen_grade_key = False
    for item in content:
        token = getattr(item, "token", "") or ""
        if "grade" in token:
            seen_grade_key = True
            continue
        found = _grade_token(token, wanted) if seen_grade_key else None
        if found is None:
            continue
        if int(found) != grade:
            return None, None  # the JSON's grade is not the token's: no trustworthy distribution
        mass = {g: 0.0 for g in grades}
        seen: set[str] = set()
        for alt in list(getattr(item, "top_logprobs", None) or []) + [item]:
            t = getattr(alt, "token", "") or ""
            g = _grade_token(t, wanted)
            if g is None or t in seen:
                continue
            seen.add(t)
            mass[int(g)] += math.exp(float(alt.logprob))
        z = sum(mass.values())
        if z <= 0:
            return None, None
        probs = {g: p / z for g, p in mass.items()}
        return probs[grade], probs
    return None, None


# The reason's length cap in llama.cpp's grammar (a small model otherwise writes until max_tokens, and a
# truncated answer is a malformed one); OpenAI's strict schemas take no maxLength, the prompt asks for 15 words.
REASON_MAX_CHARS = 80


def grade_schema(grades: list[int], reason_max_chars: int | None = None, with_reason: bool = True) -> dict:
    """The answer's JSON schema: `grade` first (its token is read before the reason is written), an enum of the scale;
    without the reason the object closes after the grade."""
    properties: dict = {"grade": {"type": "integer", "enum": list(grades)}}
    if with_reason:
        properties["reason"] = {"type": "string"}
        if reason_max_chars:
            properties["reason"]["maxLength"] = int(reason_max_chars)
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def response_format(kind: str, grades: list[int], with_reason: bool = True) -> dict | None:
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "relevance_grade", "strict": True,
                                                       "schema": grade_schema(grades, with_reason=with_reason)}}
    if kind == "json_object":  # llama.cpp: the schema compiled into a grammar
        return {"type": "json_object", "schema": grade_schema(grades, REASON_MAX_CHARS, with_reason)}
    return None


def expected_grade(probs: dict | None) -> float | None:
    return float(sum(float(g) * p for g, p in probs.items())) if probs else None


@dataclass
class _Pending:
    """A pair being graded: its prompt, its result so far, when it was started and how often it was tried."""

    query: str
    text: str
    messages: list[dict]
    result: TierResult = field(default_factory=TierResult)
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    timeouts: int = 0
    key: str | None = None  # the response key (annomine/judges/response_cache.py)


class _Scheduler:
    """Runs `attempt(job)` for every job on a fixed number of workers until each is settled.

    `attempt` returns None (settled) or the seconds before the job may be tried again; a waiting job sits in a
    heap keyed by that time, not in a worker. Each worker takes the earliest job whose wait is over, else a new
    one, else sleeps until the next wait ends. A worker that raises stops the others and the error is re-raised.
    Progress is logged every `progress_s` seconds (LLM calls on CPU can take seconds each).
    """

    def __init__(self, attempt, jobs: list, name: str = "llm", progress_s: float = 30.0):
        self.attempt = attempt
        self.name, self.total, self.progress_s = name, len(jobs), progress_s
        self.started = self.last_log = time.monotonic()
        self.fresh = collections.deque(jobs)
        self.waiting: list[tuple[float, int, object]] = []
        self.unsettled = len(jobs)
        self.failed = False
        self.cond = threading.Condition()
        self.order = itertools.count()

    def _next(self):
        with self.cond:
            while True:
                if self.failed or self.unsettled == 0:
                    return None
                now = time.monotonic()
                if self.waiting and self.waiting[0][0] <= now:
                    return heapq.heappop(self.waiting)[2]
                if self.fresh:
                    return self.fresh.popleft()
                self.cond.wait(self.waiting[0][0] - now if self.waiting else None)

    def _work(self) -> None:
        try:
            while (job := self._next()) is not None:
                delay = self.attempt(job)
                with self.cond:
                    if delay is None:
                        self.unsettled -= 1
                        self._log_progress()
                    else:
                        heapq.heappush(self.waiting, (time.monotonic() + delay, next(self.order), job))
                    self.cond.notify_all()
        except BaseException:
            with self.cond:
                self.failed = True
                self.cond.notify_all()
            raise

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= self.progress_s and self.unsettled:
            self.last_log = now
            done = self.total - self.unsettled
            log.info("%s: %d/%d pairs graded (%.2f pairs/s)", self.name, done, self.total, done / (now - self.started))

    def run(self, workers: int) -> None:
        if workers <= 1:
            return self._work()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name) as pool:
            for future in [pool.submit(self._work) for _ in range(workers)]:
                future.result()


class LLMTier:
    """A grading tier over one endpoint; the client is built lazily in the process that uses it."""

    def __init__(self, name: str, cfg: LLMTierConfig, grades: list[int], base_url: str, api_key: str):
        self.name = name
        self.cfg = cfg
        self.grades = list(grades)
        self.base_url = base_url
        self._api_key = api_key
        self._client = None
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._fatal: str | None = None  # set by the first 401/403: later pairs fail at once
        # Stored answers by response key (loaded on the driver from `llm_responses`, shipped to the workers):
        # a pair whose key is here is answered without a request.
        self.responses: dict[str, dict] = {}
        # (response key, answer, prompt tokens, completion tokens) of each answer a request paid for in this process.
        self.answered: list[tuple] = []
        # answers from the cache, requests made and their tokens, in this process
        self.cache_counts = {"hits": 0, "misses": 0, "prompt_tokens": 0, "completion_tokens": 0}
        # Batch mode (annomine/judges/batch.py): a pair without a stored answer is queued for a batch, not requested;
        # `batch_failed` holds the failed batch lines by response key: (batch attempts, error).
        self.batch = False
        self.batch_failed: dict[str, tuple[int, str]] = {}

    def __getstate__(self):  # picklable for pandas-UDF closures: no client, no lock
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lock"] = None
        state["answered"] = []
        state["cache_counts"] = {"hits": 0, "misses": 0, "prompt_tokens": 0, "completion_tokens": 0}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"LLMTier({self.name}, model={self.cfg.model}, base_url={self.base_url})"

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key, max_retries=0,
                                             timeout=self.cfg.timeout_s, default_headers=self.cfg.extra_headers or None)
            return self._client

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt)) * (0.5 + self._rng.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
        return delay

    def grade(self, query: str, text: str) -> TierResult:
        """Grade one pair, sleeping through its backoffs (one caller, one pair: nothing else could use the slot)."""
        job = _Pending(query, text, build_messages(query, text, self.grades, self.cfg.prompt_version))
        while (delay := self._attempt(job)) is not None:
            time.sleep(delay)
        return job.result

    def _text(self, exc: Exception, limit: int) -> str:
        """An endpoint's error text, redacted before it is cut (a cut key would escape redaction)."""
        return redact(str(exc), self._api_key)[:limit]

    def request_kwargs(self, messages: list[dict]) -> dict:
        """The chat-completions arguments of one grading request (the body sent to the endpoint)."""
        kwargs = dict(model=self.cfg.model, messages=messages, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
        if self.cfg.logprobs:
            kwargs.update(logprobs=True, top_logprobs=max(self.cfg.top_logprobs, len(self.grades)))
        fmt = response_format(self.cfg.effective_response_format, self.grades, self.cfg.effective_reason)
        if fmt is not None:
            kwargs["response_format"] = fmt
        return kwargs

    def _attempt(self, job: _Pending) -> float | None:
        """One request for `job`. None when the pair is settled (graded, failed for good, or the key was refused);
        otherwise the seconds to wait before its next attempt (backoff with jitter, at least the Retry-After)."""
        import openai

        result = job.result
        if self._fatal:  # after a refusal no request is sent
            result.error, result.fatal = self._fatal, True
            return self._settle(job)
        attempt = job.attempts
        job.attempts += 1
        result.attempts = job.attempts
        retry_after = None
        timeout = self.cfg.timeout_for(job.timeouts)
        try:
            client = self.client if job.timeouts == 0 else self.client.with_options(timeout=timeout)
            read_completion(post_chat_completion(client, self.request_kwargs(job.messages)), result, self.grades,
                            self.cfg.fallback_confidence)
            return self._settle(job)
        except openai.RateLimitError as exc:
            error, retry_after = "429 rate limited", _retry_after_seconds(exc)
        except openai.APITimeoutError:
            error = f"timeout after {timeout:g}s"
            job.timeouts += 1
        except openai.APIConnectionError as exc:
            error = f"connection error: {type(exc).__name__}"
        except openai.APIStatusError as exc:
            error, retry_after = f"HTTP {exc.status_code}", _retry_after_seconds(exc)
            if exc.status_code in AUTH_STATUSES:
                self._fatal = f"{error}: {self._text(exc, 200)} (key refused, not retried)"
                result.error, result.fatal = self._fatal, True
                return self._settle(job)
            if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                result.error = f"{error}: {self._text(exc, 200)} (not retried)"
                return self._settle(job)
        except MalformedAnswer as exc:
            error = f"malformed answer: {exc}"
        except Exception as exc:  # noqa: BLE001 - an unparseable body, a client surprise: record, retry
            error = f"{type(exc).__name__}: {self._text(exc, 160)}"
        result.error = f"{error} (after {job.attempts} attempt(s))"
        if job.attempts >= self.cfg.max_attempts:
            return self._settle(job)
        return self._backoff(attempt, retry_after)

    def _settle(self, job: _Pending) -> None:
        result = job.result
        result.latency_ms = (time.perf_counter() - job.started) * 1000.0
        if result.error:
            result.grade = None
        result.error = redact(result.error, self._api_key)
        result.reason = redact(result.reason, self._api_key)
        return None

    def messages(self, query: str, text: str) -> list[dict]:
        return build_messages(query, text, self.grades, self.cfg.prompt_version)

    def response_key(self, query: str, text: str) -> str:
        """The cache key of the request that grades (query, text)."""
        return response_key(self.cfg, self.request_kwargs(build_messages(query, text, self.grades, self.cfg.prompt_version)))

    def is_stored(self, query: str, text: str) -> bool:
        """Whether the answer for (query, text) is in the response cache (no request, no cost)."""
        return bool(self.responses) and self.response_key(query, text) in self.responses

    def _stored_result(self, key: str) -> TierResult:
        answer = self.responses[key]
        probs = {int(g): float(p) for g, p in answer["probs"].items()} if answer.get("probs") else None
        return TierResult(grade=answer["grade"], raw_confidence=answer.get("raw_confidence"),
                          confidence_source=answer.get("confidence_source"), probs=probs,
                          expected_grade=answer.get("expected_grade"), reason=answer.get("reason"),
                          extra={"cache": "hit", "response_key": key})

    def queued_result(self, job: _Pending) -> TierResult:
        """Batch mode: the pair waits for its batch answer (`batch: queued`), or fails like an online pair once its
        batch line failed `max_attempts` times (`batch: failed`)."""
        attempts, error = self.batch_failed.get(job.key, (0, None))
        if attempts >= self.cfg.max_attempts:
            return TierResult(error=redact(f"batch: {error} (after {attempts} batch attempt(s))", self._api_key),
                              attempts=0, extra={"batch": "failed", "response_key": job.key})
        return TierResult(extra={"batch": "queued", "response_key": job.key, "prompt_chars": prompt_chars(job.messages)})

    def grade_many(self, pairs: list[tuple[str, str]], concurrency: int) -> list[TierResult]:
        """Grade de-duplicated (query, text) pairs with at most `concurrency` requests in flight.

        A pair whose answer is in the response cache (`responses`) is answered from it without a request
        (`cache: hit` in its output); every other pair is requested (`cache: miss`, with its `response_key`).
        `concurrency` workers each send one request at a time, so the cap holds; a pair that must back off waits
        in a timer queue rather than in a worker, so while it waits its worker sends another pair's request:
        the slots stay busy as long as any pair is ready. Pairs whose backoff is over go before new ones.
        In batch mode (`batch`) no request is made: every other pair is queued for a batch (`queued_result`)."""
        unique = list(dict.fromkeys(pairs))
        if not unique:
            return []
        if self.cfg.effective_max_concurrency:
            concurrency = min(max(1, concurrency), self.cfg.effective_max_concurrency)
        by_pair: dict[tuple[str, str], TierResult] = {}
        jobs = []
        for q, t in unique:
            messages = build_messages(q, t, self.grades, self.cfg.prompt_version)
            key = response_key(self.cfg, self.request_kwargs(messages))
            if key in self.responses:
                by_pair[(q, t)] = self._stored_result(key)
            else:
                jobs.append(_Pending(q, t, messages, key=key))
        self.cache_counts["hits"] += len(unique) - len(jobs)
        if self.batch:
            by_pair.update({(job.query, job.text): self.queued_result(job) for job in jobs})
            jobs = []
        self.cache_counts["misses"] += len(jobs)
        if jobs:
            _Scheduler(self._attempt, jobs, self.name).run(min(max(1, concurrency), len(jobs)))
        for job in jobs:
            result = job.result
            result.extra.update(cache="miss", response_key=job.key, prompt_chars=prompt_chars(job.messages))
            self.cache_counts["prompt_tokens"] += result.prompt_tokens
            self.cache_counts["completion_tokens"] += result.completion_tokens
            if result.grade is not None:
                self.answered.append((job.key, answer_of(result), result.prompt_tokens, result.completion_tokens,
                                      result.extra["prompt_chars"]))
            by_pair[(job.query, job.text)] = result
        out = []
        seen = set()
        for pair in pairs:
            r = by_pair[pair]
            if pair in seen:  # a duplicate shares the answer but not the cost
                r = TierResult(**{**r.__dict__, "latency_ms": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "attempts": 0,
                                  "extra": {"deduplicated": True, **{k: v for k, v in r.extra.items() if k == "batch"}}})
            seen.add(pair)
            out.append(r)
        return out
