"""The batch half of the loopback LLM server: OpenAI's Files and Batches protocol over the same completion logic.

`POST /v1/files` (multipart: `file`, `purpose`) stores an upload; `GET /v1/files/{id}` and `/v1/files/{id}/content`
give it back. `POST /v1/batches` (`input_file_id`, `endpoint`, `completion_window`, `metadata`) creates a batch in
status `validating`; each `GET /v1/batches/{id}` moves it one step on (`validating` -> `in_progress` -> `completed`),
and on reaching `completed` every line of its input file is answered by the same function that answers
`POST /v1/chat/completions` (faults included), the answers written to an output file (`output_file_id`) and failed
lines to an error file (`error_file_id`), in the JSONL shape of OpenAI's (and vLLM `run-batch`'s) output:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
`GET /v1/batches` lists the batches (newest first) with their metadata; `POST /v1/batches/{id}/cancel` cancels one.
Lines whose request mentions one of `fail_texts` fail with a 500 the first `fail_times` times their custom_id is
seen (per-line errors a client must retry). `stats()` counts the lines answered per custom_id.
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import json
import threading
import time
import uuid

# What each GET of a batch moves it to.
NEXT_STATUS = {"validating": "in_progress", "in_progress": "completed"}


def parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, bytes)} of a multipart/form-data body."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class BatchStore:
    """Files and batches of one server; `complete(body) -> (status code, body)` answers one request."""

    def __init__(self, complete, fail_texts: tuple[str, ...] = (), fail_times: int = 1):
        self.complete = complete
        self.fail_texts = tuple(t for t in fail_texts if t)
        self.fail_times = int(fail_times)
        self.files: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.lines = collections.Counter()  # custom_id -> times answered (or failed) in a batch
        self.failed = collections.Counter()  # custom_id -> times failed on purpose
        self.lock = threading.Lock()

    def stats(self) -> dict:
        with self.lock:
            return {"files": len(self.files), "batches": len(self.batches), "lines": sum(self.lines.values()),
                    "by_custom_id": dict(self.lines), "failed_on_purpose": sum(self.failed.values())}

    def add_file(self, filename: str | None, purpose: str, data: bytes) -> dict:
        fid = f"file-{uuid.uuid4().hex[:16]}"
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename or "upload.jsonl", "purpose": purpose, "status": "processed"}
        with self.lock:
            self.files[fid], self.content[fid] = meta, data
        return meta

    def create(self, body: dict) -> tuple[int, dict]:
        fid = body.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"no file {fid!r}", "type": "invalid_request_error"}}
        if body.get("endpoint") != "/v1/chat/completions":
            return 400, {"error": {"message": f"endpoint {body.get('endpoint')!r} not supported", "type": "invalid_request_error"}}
        bid = f"batch_{uuid.uuid4().hex[:16]}"
        now = int(time.time())
        batch = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None, "input_file_id": fid,
                 "completion_window": body.get("completion_window") or "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "expires_at": now + 86400,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata") or {}}
        with self.lock:
            self.batches[bid] = batch
        return 200, batch

    def retrieve(self, bid: str) -> tuple[int, dict]:
        with self.lock:
            batch = self.batches.get(bid)
            if batch is None:
                return 404, {"error": {"message": f"no batch {bid!r}", "type": "not_found"}}
            step = NEXT_STATUS.get(batch["status"])
            if step:
                batch["status"] = step
                batch[f"{step}_at"] = int(time.time())
            done = step == "completed"
        if done:
            self._run(batch)
        with self.lock:
            return 200, json.loads(json.dumps(batch))

    def cancel(self, bid: str) -> tuple[int, dict]:
        with self.lock:
            batch = self.batches.get(bid)
            if batch is None:
                return 404, {"error": {"message": f"no batch {bid!r}", "type": "not_found"}}
            if batch["status"] in ("validating", "in_progress"):
                batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            return 200, dict(batch)

    def listing(self) -> dict:
        with self.lock:
            data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
            return {"object": "list", "data": [dict(b) for b in data], "has_more": False,
                    "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def _run(self, batch: dict) -> None:
        """Answer every line of the batch's input file; write the output and error files."""
        out, err = [], []
        for n, line in enumerate(self.content[batch["input_file_id"]].decode().splitlines()):
            if line.strip():
                ok, record = self._answer_line(n, line)
                (out if ok else err).append(json.dumps(record))
        now = int(time.time())
        if out:
            batch["output_file_id"] = self.add_file(f"{batch['id']}_output.jsonl", "batch_output", ("\n".join(out) + "\n").encode())["id"]
        if err:
            batch["error_file_id"] = self.add_file(f"{batch['id']}_error.jsonl", "batch_output", ("\n".join(err) + "\n").encode())["id"]
        with self.lock:
            batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
            batch["finalizing_at"] = batch["completed_at"] = now

    def _answer_line(self, n: int, line: str) -> tuple[bool, dict]:
        """(answered, the output or error line) of input line `n`."""
        rid = f"batch_req_{uuid.uuid4().hex[:16]}"
        try:
            req = json.loads(line)
            cid, body = req["custom_id"], req["body"]
            if req.get("url") != "/v1/chat/completions" or not isinstance(body, dict):
                raise ValueError(f"url {req.get('url')!r} or body not supported")
        except (ValueError, KeyError, TypeError) as exc:
            return False, {"id": rid, "custom_id": None, "response": None,
                           "error": {"code": "invalid_request", "message": f"line {n + 1}: {exc}"}}
        with self.lock:
            self.lines[cid] += 1
            fail = (any(t in json.dumps(body.get("messages")) for t in self.fail_texts)
                    and self.failed[cid] < self.fail_times)
            if fail:
                self.failed[cid] += 1
        if fail:
            status, answer = 500, {"error": {"message": "server error (chosen line)", "type": "server_error"}}
        else:
            status, answer = self.complete(body)
        record = {"id": rid, "custom_id": cid, "error": None,
                  "response": {"status_code": status, "request_id": rid, "body": answer}}
        return status == 200, record
