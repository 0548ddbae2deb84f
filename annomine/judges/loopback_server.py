"""A loopback HTTP server that speaks the OpenAI chat-completions protocol: the test double of the
LLM tiers (tests, benchmarks, the demo's tiers 2-3), run by the cascade with `cascade.loopback.embedded`
(annomine/judges/cascade.py) or on its own with `annomine fake-llm-server` (jobs/fake_llm_server.py).

No real LLM is reachable in tests or the demo. It answers `POST /v1/chat/completions`
with a deterministic grade from a simple rule: the share of the query's words found in the
product text, mapped onto the grade scale. It reads the query and product only from the prompt's
data block (`<<<DATA {json} DATA>>>`). Like a careless model it obeys an instruction "answer N"
written anywhere OUTSIDE that block, so a prompt that mixes data into its instructions is caught
by tests. With `logprobs: true` it returns token log-probabilities whose top alternatives for the
grade token carry the rule's confidence (higher for models whose name contains "large").

Faults are drawn per request from a seeded generator: `429` (with Retry-After), `500`, `slow`
(sleeps `slow_ms` before answering), `malformed` (an answer that is not JSON), `truncated`
(JSON cut off, finish_reason "length"), `garbage` (a response body that is not JSON at all), `401`
(the key is refused, and the error body echoes it back, as careless gateways do). Like vLLM or TGI,
a `slow` request stops as soon as its client hangs up (a client timeout), so the requests in flight are
those some client is still waiting for; `abandoned` counts those that were cut short. A request that
arrives first looks at the connections of the others in flight: one its client has already closed is not
counted in `in_flight_max` (its handler may not have woken up to the hang-up yet), so the figure is the
number of requests clients held open at once.
It also speaks OpenAI's Files and Batches protocol (annomine/judges/loopback_batches.py): a batch's lines are
answered by the same completion function and faults as online requests, and `batch_fail` names texts whose lines
fail the first `batch_fail_times` times (per-line errors).
`GET /stats` returns request and fault counters (`batch`: lines answered per custom_id); `GET /v1/models` lists models.
Only 127.0.0.1 by default; stdlib `http.server` only.
"""

from __future__ import annotations

import json
import math
import random
import re
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from annomine.judges.loopback_batches import BatchStore, parse_multipart

FAULT_KINDS = ("429", "500", "slow", "malformed", "truncated", "garbage", "401")
_WORD = re.compile(r"[a-z0-9]+")
_DATA = re.compile(r"<<<DATA\s*(.*?)\s*DATA>>>", re.S)
_OBEY = re.compile(r"answer\s+(?:with\s+)?(?:grade\s+)?(-?\d+)", re.I)


def parse_faults(spec: str | None) -> dict[str, float]:
    """'429=0.2,500=0.1' -> {'429': 0.2, '500': 0.1}; an error names a bad entry."""
    faults: dict[str, float] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"fault {part!r} must look like kind=probability (kinds: {', '.join(FAULT_KINDS)})")
        kind, prob = (x.strip() for x in part.split("=", 1))
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        p = float(prob)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"fault {kind}: probability {p} not in [0, 1]")
        faults[kind] = p
    if sum(faults.values()) > 1.0 + 1e-9:
        raise ValueError(f"fault probabilities add up to {sum(faults.values()):.2f} > 1")
    return faults


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def rule_grade(query: str, product: str, grades: list[int]) -> tuple[int, float, float]:
    """(grade, overlap, position) from the share of distinct query words present in the product text."""
    q = set(words(query))
    p = set(words(product))
    overlap = len(q & p) / len(q) if q else 0.0
    lo, hi = min(grades), max(grades)
    position = overlap * (hi - lo)
    return int(lo + round(position)), overlap, position


def rule_distribution(position: float, grades: list[int], sharp: bool) -> dict[int, float]:
    """Probabilities over grades peaked at the rule's grade; flatter near a rounding boundary."""
    lo = min(grades)
    centre = lo + position
    temperature = 0.35 if sharp else 0.6
    scores = {g: -((g - centre) ** 2) / temperature for g in grades}
    m = max(scores.values())
    z = sum(math.exp(s - m) for s in scores.values())
    return {g: math.exp(s - m) / z for g, s in scores.items()}


def _schema_omits_reason(response_format) -> bool:
    """Whether a request's response_format (json_schema or llama.cpp's json_object form) leaves out `reason`."""
    if not isinstance(response_format, dict):
        return False
    schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema")
    return isinstance(schema, dict) and isinstance(schema.get("properties"), dict) and "reason" not in schema["properties"]


def _tokens(content: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+|\s+", content)


def _data_block(text: str) -> tuple[dict, str]:
    """The prompt's data block (the one holding a JSON object; {} when none) and the prompt's text outside it."""
    data: dict = {}
    outside = text
    for block in _DATA.finditer(text):  # the data block is the one holding a JSON object
        try:
            candidate = json.loads(block.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(candidate, dict):
            data = candidate
            outside = outside.replace(block.group(0), " ")
    return data, outside


def _content(answer: dict, grade: int, fault: str | None) -> tuple[str, str]:
    """The completion's content and finish reason: the JSON answer, spoilt as a 'malformed' or 'truncated' fault says."""
    content = json.dumps(answer)
    finish = "stop"
    if fault == "malformed":
        content = f"The grade is {grade} because it looks fine."
    elif fault == "truncated":
        content = content[: max(3, len(content) // 3)]
        finish = "length"
    return content, finish


def _logprobs(content: str, grade: int, dist: dict[int, float], k: int, fault: str | None) -> dict:
    """The choice's `logprobs`: the grade token's top-k from the rule distribution, every other token sure."""
    items = []
    for tok in _tokens(content):
        if tok.strip().lstrip("-").isdigit() and int(tok) == grade and fault != "malformed":
            top = sorted(((str(g), math.log(max(p, 1e-12))) for g, p in dist.items()), key=lambda x: -x[1])[:k]
            lp = math.log(max(dist.get(grade, 1e-12), 1e-12))
            items.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                          "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]})
        else:
            items.append({"token": tok, "logprob": -0.01, "bytes": list(tok.encode()),
                          "top_logprobs": [{"token": tok, "logprob": -0.01, "bytes": list(tok.encode())}]})
    return {"content": items}


def _closed_by_peer(conn: socket.socket) -> bool:
    """Whether the client has closed `conn` (readable with nothing to read), without waiting or consuming bytes."""
    try:
        if not select.select([conn], [], [], 0)[0]:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _State:
    def __init__(self, latency_ms: float, faults: dict[str, float], grades: list[int], seed: int, slow_ms: float,
                 retry_after_s: float, logprobs_supported: bool, fail_texts: tuple[str, ...] = (), fail_times: int = 1):
        self.latency_ms = latency_ms
        self.faults = faults
        self.grades = grades
        self.rng = random.Random(seed)
        self.slow_ms = slow_ms
        self.retry_after_s = retry_after_s
        self.logprobs_supported = logprobs_supported
        self.lock = threading.Lock()
        self.stats: dict = {"requests": 0, "completions": 0, "faults": {k: 0 for k in FAULT_KINDS}, "by_model": {},
                            "obeyed_instruction": 0, "in_flight_max": 0, "abandoned": 0,
                            # request-seconds served, and the wall-clock window they fall in (epoch seconds):
                            # busy_seconds / (window x cap) is the share of a client's allowed concurrency kept busy
                            "busy_seconds": 0.0, "first_request_at": None, "last_response_at": None}
        self.open_connections: dict[int, socket.socket] = {}  # handler id -> connection of a request in flight
        self.batches = BatchStore(lambda body: batch_line_answer(self, body), fail_texts, fail_times)

    def count_fault(self, fault: str | None) -> str | None:
        if fault:
            with self.lock:
                self.stats["faults"][fault] += 1
        return fault

    def draw_fault(self) -> str | None:
        with self.lock:
            x = self.rng.random()
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += self.faults.get(kind, 0.0)
            if x < acc:
                return kind
        return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "annomine-loopback-llm/1"
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the status line + headers and the body are separate writes; with Nagle on, the body waits for the
    # client's delayed ACK of the headers (~40-50 ms a request, measured: 251 ms per 200 ms request), which real
    # servers (uvicorn, vLLM) do not add.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet: tests run thousands of requests
        return

    @property
    def state(self) -> _State:
        return self.server.state  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _wait_unless_hung_up(self, seconds: float) -> bool:
        """Sleep like a slow model, but stop early when the client closes the connection; True if it did."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.connection], [], [], left)[0]:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
                time.sleep(min(left, 0.01))  # bytes of a next request, not a hang-up: keep waiting
        return False

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") == "/stats":
            with self.state.lock:
                stats = json.loads(json.dumps(self.state.stats))
            return self._json(200, {**stats, "batch": self.state.batches.stats()})
        if self._batch_get():
            return None
        if self.path.rstrip("/") == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": "rule-small", "object": "model"},
                                                               {"id": "rule-large", "object": "model"}]})
        return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self._batch_post(raw):
            return
        st = self.state
        arrived = time.time()
        with st.lock:
            st.stats["requests"] += 1
            if st.stats["first_request_at"] is None:
                st.stats["first_request_at"] = arrived
            st.open_connections[id(self)] = self.connection
            held = sum(1 for conn in st.open_connections.values() if not _closed_by_peer(conn))
            st.stats["in_flight_max"] = max(st.stats["in_flight_max"], held)
        try:
            self._complete(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout during a 'slow' fault)
        finally:
            done = time.time()
            with st.lock:
                st.open_connections.pop(id(self), None)
                st.stats["busy_seconds"] += done - arrived
                st.stats["last_response_at"] = max(done, st.stats["last_response_at"] or done)

    def _answer_fault(self, fault: str | None) -> bool:
        """Answer the request as an injected fault that replaces the completion says; True when it was answered."""
        st = self.state
        if fault == "429":
            self._json(429, {"error": {"message": "rate limited (injected)", "type": "rate_limit_error"}},
                       {"Retry-After": f"{st.retry_after_s:g}"})
        elif fault == "401":
            key = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            message = f"Incorrect API key provided: {key} (header 'Authorization: Bearer {key}')"
            self._json(401, {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}})
        elif fault == "500":
            self._json(500, {"error": {"message": "server error (injected)", "type": "server_error"}})
        elif fault == "garbage":
            self._send(200, b"<html>upstream proxy error</html>{not json", content_type="application/json")
        elif fault == "slow" and self._wait_unless_hung_up(st.slow_ms / 1000.0):
            with st.lock:
                st.stats["abandoned"] += 1
            self.close_connection = True
        else:
            return False
        return True

    def _complete(self, raw: bytes):
        st = self.state
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        try:
            body = json.loads(raw or b"{}")
            body["messages"]  # noqa: B018 - a request without messages is a bad request
        except (ValueError, KeyError, TypeError) as exc:
            return self._json(400, {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}})
        if st.latency_ms:
            time.sleep(st.latency_ms / 1000.0)
        fault = st.count_fault(st.draw_fault())
        if self._answer_fault(fault):
            return None
        return self._json(200, completion(st, body, fault))

    def _batch_post(self, raw: bytes) -> bool:
        """The Files and Batches endpoints (annomine/judges/loopback_batches.py); False for another path."""
        path, batches = self.path.split("?")[0].rstrip("/"), self.state.batches
        if path == "/v1/files":
            fields = parse_multipart(self.headers.get("Content-Type", ""), raw)
            if "file" not in fields:
                return self._json(400, {"error": {"message": "no file field", "type": "invalid_request_error"}}) or True
            filename, data = fields["file"]
            purpose = fields.get("purpose", (None, b"batch"))[1].decode()
            return self._json(200, batches.add_file(filename, purpose, data)) or True
        if path == "/v1/batches":
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                return self._json(400, {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}}) or True
            return self._json(*batches.create(body)) or True
        if path.startswith("/v1/batches/") and path.endswith("/cancel"):
            return self._json(*batches.cancel(path.split("/")[3])) or True
        return False

    def _batch_get(self) -> bool:
        path, batches = self.path.split("?")[0].rstrip("/"), self.state.batches
        parts = path.split("/")
        if path == "/v1/batches":
            return self._json(200, batches.listing()) or True
        if len(parts) == 4 and path.startswith("/v1/batches/"):
            return self._json(*batches.retrieve(parts[3])) or True
        if path.startswith("/v1/files/") and len(parts) in (4, 5):
            fid = parts[3]
            if fid not in batches.files or (len(parts) == 5 and parts[4] != "content"):
                return self._json(404, {"error": {"message": f"no file {fid!r}", "type": "not_found"}}) or True
            if len(parts) == 5:
                return self._send(200, batches.content[fid], content_type="application/octet-stream") or True
            return self._json(200, batches.files[fid]) or True
        return False


def completion(st: _State, body: dict, fault: str | None) -> dict:
    """The chat completion answering `body` (the rule's grade, its log-probabilities, spoilt as a content fault says)."""
    messages = body["messages"]
    model = str(body.get("model") or "rule-small")
    text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    grade, overlap, position, reason = _rule_answer(st, text)
    dist = rule_distribution(position, st.grades, "large" in model.lower())
    # a response schema without `reason` (LLMTierConfig.reason false) closes the object after the grade
    answer = {"grade": grade} if _schema_omits_reason(body.get("response_format")) else {"grade": grade, "reason": reason}
    content, finish = _content(answer, grade, fault)
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                    "logprobs": None}
    if body.get("logprobs") and st.logprobs_supported:
        choice["logprobs"] = _logprobs(content, grade, dist, int(body.get("top_logprobs") or 5), fault)
    usage = {"prompt_tokens": len(words(text)) + 4 * len(messages), "completion_tokens": len(_tokens(content))}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    with st.lock:
        st.stats["completions"] += 1
        st.stats["by_model"][model] = st.stats["by_model"].get(model, 0) + 1
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}


def batch_line_answer(st: _State, body: dict) -> tuple[int, object]:
    """(status code, body) of one batch line: the online answer, the same faults drawn (a 'slow' one only answers)."""
    if not isinstance(body.get("messages"), list):
        return 400, {"error": {"message": "bad request: no messages", "type": "invalid_request_error"}}
    fault = st.count_fault(st.draw_fault())
    if fault in ("429", "500", "401"):
        kind = {"429": "rate_limit_error", "500": "server_error", "401": "invalid_request_error"}[fault]
        return int(fault), {"error": {"message": f"{fault} (injected)", "type": kind}}
    if fault == "garbage":
        return 200, "<html>upstream proxy error</html>{not json"
    return 200, completion(st, body, fault)


def _rule_answer(st: _State, text: str) -> tuple[int, float, float, str]:
    """The grade, word overlap, position on the grade scale and reason for a prompt."""
    data, outside = _data_block(text)
    obey = _OBEY.search(outside)
    if obey and int(obey.group(1)) in st.grades:
        with st.lock:
            st.stats["obeyed_instruction"] += 1
        return int(obey.group(1)), float("nan"), float(int(obey.group(1)) - min(st.grades)), "followed an instruction in the prompt"
    if data:
        grade, overlap, position = rule_grade(str(data.get("query", "")), str(data.get("product", "")), st.grades)
        return grade, overlap, position, f"{overlap:.0%} of query words in product"
    # No data block: grading the whole prompt against itself is meaningless; answer the lowest grade.
    return min(st.grades), 0.0, 0.0, "no data block found"


class LoopbackLLMServer:
    """`with LoopbackLLMServer(latency_ms=200) as srv: srv.base_url` -> 'http://127.0.0.1:PORT/v1'."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0, faults: str | dict | None = None,
                 grades: list[int] | None = None, seed: int = 0, slow_ms: float = 3000.0, retry_after_s: float = 1.0,
                 logprobs: bool = True, batch_fail: str | tuple[str, ...] = (), batch_fail_times: int = 1):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the loopback LLM server only listens on loopback addresses, not {host!r}")
        fault_map = parse_faults(faults) if isinstance(faults, (str, type(None))) else dict(faults)
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.state = _State(latency_ms, fault_map, list(grades or [1, 2, 3, 4]), seed, slow_ms, retry_after_s, logprobs,  # type: ignore[attr-defined]
                                    tuple([batch_fail] if isinstance(batch_fail, str) else batch_fail), batch_fail_times)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self) -> dict:
        st = self._httpd.state  # type: ignore[attr-defined]
        with st.lock:
            stats = json.loads(json.dumps(st.stats))
        return {**stats, "batch": st.batches.stats()}

    def start(self) -> "LoopbackLLMServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-llm", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the `annomine fake-llm-server` command), then close."""
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
