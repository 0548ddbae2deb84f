"""The batch JSONL formats: request lines in, result lines out (OpenAI's Batch API and vLLM's `run-batch` share them).

A request line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with the body an online
request would send; `custom_id` is the request's response key (annomine/judges/response_cache.py). A result line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: the body is the chat completion,
read by the same code as an online answer (grade, reason, log-probabilities), or an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from annomine.errors import DamagedInputError
from annomine.judges.llm import TierResult, read_completion

URL = "/v1/chat/completions"


def request_line(key: str, body: dict) -> str:
    return json.dumps({"custom_id": key, "method": "POST", "url": URL, "body": body}, sort_keys=True)


def write_requests(path: Path, bodies: dict[str, dict]) -> Path:
    """Write the request JSONL whole (a temporary file renamed into place: a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for key, body in bodies.items():
            fh.write(request_line(key, body) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_requests(path: Path) -> dict[str, dict]:
    """{custom_id: body} of a request JSONL file ({} when it is gone)."""
    if not path.is_file():
        return {}
    return {r["custom_id"]: r["body"] for r in parse_lines(path.read_text(encoding="utf-8"), str(path))}


def parse_lines(text: str, where: str) -> list[dict]:
    """The JSON objects of a JSONL text; a line that is not one is one error naming `where` and the line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DamagedInputError(f"{where}: line {n} is not JSON ({exc})") from None
        if not isinstance(record, dict) or "custom_id" not in record:
            raise DamagedInputError(f"{where}: line {n} is not a batch line (no custom_id)")
        out.append(record)
    return out


def outcome(record: dict) -> tuple[str | None, dict | None, str | None]:
    """(custom_id, chat completion body, error) of a result line: the body when the request was answered (HTTP 200),
    else the error the line reports."""
    cid = record.get("custom_id")
    error = record.get("error")
    response = record.get("response") or {}
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        return cid, None, f"batch line error: {message}"[:300]
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        detail = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) else body
        return cid, None, f"HTTP {status}: {detail}"[:300]
    if not isinstance(body, dict):
        return cid, None, "malformed answer: response is not a chat completion"
    return cid, body, None


def answer_of_body(body: dict, grades: list[int], fallback_confidence: float) -> TierResult:
    """The tier's result for a batch answer, read like an online one (raises MalformedAnswer)."""
    resp = json.loads(json.dumps(body), object_hook=lambda d: SimpleNamespace(**d))
    return read_completion(resp, TierResult(attempts=1), grades, fallback_confidence)
