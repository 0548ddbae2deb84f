"""Batch mode of the LLM tiers (`annotate.mode: batch`): queue, submit, poll, collect, each request exactly once.

A run in batch mode first finishes what earlier runs started: a batch recorded as 'submitting' (killed between its
record and the endpoint's answer) is adopted from the endpoint's batch list, whose `metadata.annomine_submission`
names it, or sent again when the endpoint never got it; then every live batch is polled and a finished one's output
and error files are downloaded and read like online answers (grade, reason, log-probabilities). Its answers go to
the response cache (`llm_responses`, keyed by the request's `custom_id`, so an answer is stored once) before the
requests are marked answered; a line that failed is marked failed with its error. After that the LLM tiers grade
from the cache only: a pair whose answer is there is decided as online, any other is queued (`LLMTier.batch`), keeps
the grade of the tiers before (escalation 'batch') and its request goes into this run's batch, unless it waits in a
live batch already. A request whose line failed is sent again in the next batch, until it failed `max_attempts`
times; then the pair gets the error, like an online pair. Each batch is written as JSONL under
`<warehouse>/llm_batches/<submission_id>.jsonl` and recorded before it is uploaded (`llm_batches`,
`llm_batch_requests`); with `batch.target: file` it is only written, for `vllm run-batch`, and collected from the
output file given as `batch.results`. The answers' tokens are priced with the tier's `batch_discount`.

Test hook: with `ANNOMINE_TEST_KILL_AT_BATCH=created` the process ends at once (like kill -9) after the endpoint
created a batch and before it is recorded; with `=stored`, after a batch's answers were stored and before its
requests are marked answered.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pandas as pd

from annomine.errors import MissingInputError
from annomine.judges import batch_jsonl as jl
from annomine.judges import batch_store as bs
from annomine.judges.llm import redact
from annomine.judges.prompt import MalformedAnswer
from annomine.judges.response_cache import answer_of, answer_row, prompt_chars, response_key, store_answers, tier_settings_key

log = logging.getLogger(__name__)

KILL_ENV = "ANNOMINE_TEST_KILL_AT_BATCH"
# Endpoint statuses after which the output and error files are final.
DONE = ("completed", "expired", "cancelled", "failed")


def kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV, "").strip() == name:
        os._exit(137)


class BatchRun:
    """One run's batch work for the LLM tiers of a cascade, over the warehouse's tables and JSONL folder."""

    def __init__(self, tables, cfg, tiers: list, folder: Path):
        self.tables, self.cfg, self.folder = tables, cfg, Path(folder)
        self.tiers = [t for t in tiers if hasattr(t, "cfg")]
        self.by_name = {t.name: t for t in self.tiers}
        self.batches = bs.read(tables, bs.BATCHES)
        self.requests = bs.read(tables, bs.REQUESTS)
        self.queued: dict[str, dict[str, dict]] = {}  # tier -> response key -> request body
        self.gave_up: dict[str, str] = {}  # response key -> tier
        self.usage = {t.name: {"hits": 0, "misses": 0, "prompt_tokens": 0, "completion_tokens": 0} for t in self.tiers}
        self.stats = {"adopted": 0, "resent": 0, "collected_batches": 0, "answered": 0, "failed_lines": 0,
                      "submitted_batches": [], "submitted_requests": 0, "gave_up": 0}
        self.pending: set[str] = set()

    # ---- the start of a run: finish what earlier runs started ---------------------------------------------
    def start(self, results: str | None = None) -> None:
        """Recover interrupted submissions, collect finished batches (and a run-batch output file), prime the tiers."""
        self.recover()
        self.collect()
        if results:
            self.ingest_file(results)
        self.prime()

    def prime(self) -> None:
        """Put the tiers in batch mode with the failed requests; note the requests waiting in live batches."""
        self.requests = bs.read(self.tables, bs.REQUESTS)
        self.batches = bs.read(self.tables, bs.BATCHES)
        self.pending = bs.pending_keys(self.requests, self.batches)
        failed = bs.failed_keys(self.requests)
        for tier in self.tiers:
            tier.batch, tier.batch_failed = True, failed
        self.stats["pending"] = len(self.pending)

    def _row(self, sid: str) -> dict:
        return self.batches[self.batches["submission_id"] == sid].iloc[0].to_dict()

    def _put_batch(self, row: dict, **changes) -> None:
        row = {**row, **changes, "updated_at": bs.now()}
        bs.put(self.tables, bs.BATCHES, [row])
        kept = self.batches[self.batches["submission_id"] != row["submission_id"]]
        self.batches = pd.concat([kept, pd.DataFrame([row])], ignore_index=True) if len(kept) else pd.DataFrame([row])

    def recover(self) -> None:
        """Adopt or send again each batch recorded as 'submitting' (a run killed while it submitted)."""
        for row in self.batches[self.batches["state"] == "submitting"].to_dict("records"):
            tier = self.by_name.get(row["tier"])
            if tier is None:
                log.warning("batch %s: tier %s is not configured now; left as it is", row["submission_id"], row["tier"])
                continue
            found = self._find(tier, row)
            if found is not None:
                self._put_batch(row, batch_id=found.id, input_file_id=found.input_file_id, state=found.status)
                self.stats["adopted"] += 1
            elif Path(row["input_file"]).is_file():
                self._send(tier, row)
                self.stats["resent"] += 1
            else:
                log.warning("batch %s: its request file %s is gone; its requests are queued again",
                            row["submission_id"], row["input_file"])
                self._put_batch(row, state="lost")

    def _find(self, tier, row: dict):
        """The endpoint's batch created for submission `row` (its metadata names it), or None."""
        since = pd.Timestamp(row["created_at"]).timestamp() - 3600
        for batch in self._client(tier).batches.list(limit=100):
            if (batch.metadata or {}).get("annomine_submission") == row["submission_id"]:
                return batch
            if batch.created_at < since:
                return None
        return None

    @staticmethod
    def _client(tier):
        return tier.client.with_options(max_retries=3)

    # ---- collecting ---------------------------------------------------------------------------------
    def collect(self) -> None:
        """Poll every live batch sent through the API; collect the finished ones (waiting up to `wait_s`)."""
        deadline = time.monotonic() + self.cfg.wait_s
        while True:
            live = bs.live_batches(self.batches)
            live = live[(live["target"] == "openai") & live["batch_id"].notna()]
            for row in live.to_dict("records"):
                if row["tier"] in self.by_name:
                    self._poll(self.by_name[row["tier"]], row)
            left = bs.live_batches(self.batches)
            if (left["target"] == "openai").sum() == 0 or time.monotonic() + self.cfg.poll_s > deadline:
                return
            time.sleep(self.cfg.poll_s)

    def _poll(self, tier, row: dict) -> None:
        client = self._client(tier)
        batch = client.batches.retrieve(row["batch_id"])
        if batch.status not in DONE:
            if batch.status != row["state"]:
                self._put_batch(row, state=batch.status)
            return
        records = []
        for fid in (batch.output_file_id, batch.error_file_id):
            if fid:
                records += jl.parse_lines(client.files.content(fid).text, f"batch {batch.id} file {fid}")
        why = f"the batch ended {batch.status}" + (f": {batch.errors}" if getattr(batch, "errors", None) else "")
        self.ingest(row, records, why)
        self._put_batch(row, state="collected" if batch.status == "completed" else batch.status,
                        output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)
        self.stats["collected_batches"] += 1
        log.info("batch %s (%s): %s, collected", batch.id, tier.name, batch.status)

    def ingest_file(self, path: str) -> None:
        """Collect the `file` batches whose requests a `vllm run-batch` output file answers."""
        p = Path(path)
        if not p.is_file():
            raise MissingInputError(f"annotate: batch results file {path} does not exist")
        records = jl.parse_lines(p.read_text(encoding="utf-8"), str(p))
        ids = {r.get("custom_id") for r in records}
        live = bs.live_batches(self.batches)
        for row in live[live["target"] == "file"].to_dict("records"):
            mine = self.requests[self.requests["submission_id"] == row["submission_id"]]
            if ids & set(mine["custom_id"]):
                self.ingest(row, [r for r in records if r.get("custom_id") in set(mine["custom_id"])],
                            f"no line for it in {path}")
                self._put_batch(row, state="collected", output_file_id=str(p))
                self.stats["collected_batches"] += 1

    def ingest(self, row: dict, records: list[dict], missing_why: str) -> None:
        """Store the answers of a batch's result lines in the response cache, then mark its requests answered or
        failed (a line missing from the results is failed with `missing_why`)."""
        reqs = self.requests[(self.requests["submission_id"] == row["submission_id"]) & (self.requests["state"] == "pending")]
        settings = dict(zip(reqs["custom_id"], reqs["settings_key"]))
        attempts = dict(zip(reqs["custom_id"], reqs["attempts"]))
        tiers = {tier_settings_key(t): t for t in self.tiers}
        bodies = jl.read_requests(Path(str(row["input_file"])))
        answers, failures = {}, {}
        for record in records:
            cid, body, error = jl.outcome(record)
            if cid not in settings or cid in answers:
                continue
            tier = tiers.get(settings[cid])
            if tier is None:
                failures[cid] = "its tier's settings changed after the batch was submitted"
            elif error:
                failures[cid] = error
            else:
                self._answer(tier, cid, body, bodies.get(cid), answers, failures)
        for cid in set(settings) - set(answers) - set(failures):
            failures[cid] = f"no result: {missing_why}"
        keys = [getattr(t, "_api_key", None) for t in self.tiers]
        failures = {c: redact(e, *keys) for c, e in failures.items()}  # an endpoint may echo the key
        store_answers(self.tables, list(answers.values()), self.tiers)
        kill_point("stored")
        stamp = bs.now()
        rows = [{"custom_id": c, "submission_id": row["submission_id"], "tier": row["tier"], "settings_key": settings[c],
                 "state": "answered" if c in answers else "failed", "attempts": attempts[c],
                 "error": failures.get(c), "updated_at": stamp} for c in settings]
        bs.put(self.tables, bs.REQUESTS, rows)
        kept = self.requests[~self.requests["custom_id"].isin(set(settings))]
        self.requests = pd.concat([kept, pd.DataFrame(rows)], ignore_index=True) if len(kept) else pd.DataFrame(rows)
        self.stats["answered"] += len(answers)
        self.stats["failed_lines"] += len(failures)

    def _answer(self, tier, cid: str, body: dict, request: dict | None, answers: dict, failures: dict) -> None:
        """Read one answered line into `answers` (a stored answer row), or its problem into `failures`."""
        usage = self.usage[tier.name]
        usage["misses"] += 1
        try:
            result = jl.answer_of_body(body, tier.grades, tier.cfg.fallback_confidence)
        except MalformedAnswer as exc:
            failures[cid] = f"malformed answer: {exc}"
            return
        usage["prompt_tokens"] += result.prompt_tokens
        usage["completion_tokens"] += result.completion_tokens
        chars = prompt_chars(request["messages"]) if request else 0
        answers[cid] = answer_row(tier, cid, answer_of(result), result.prompt_tokens, result.completion_tokens, chars)

    # ---- queueing and submitting ---------------------------------------------------------------------
    def note(self, graded: pd.DataFrame, chunk) -> None:
        """Take the requests a graded chunk queued (`tier_outputs` entries with `batch: queued`) for this run's
        batches, with the bodies rebuilt from the chunk's query and text; note the requests given up."""
        wanted: dict[tuple, list[tuple[str, str]]] = {}
        for qid, pid, text in zip(graded["query_id"], graded["product_id"], graded["tier_outputs"]):
            for name, out in json.loads(text or "{}").items():
                key = out.get("response_key")
                if out.get("batch") == "failed" and key:
                    self.gave_up[key] = name
                elif out.get("batch") == "queued" and key and key not in self.pending:
                    if key not in self.queued.get(name, {}):
                        wanted.setdefault((qid, pid), []).append((name, key))
        if not wanted:
            return
        from pyspark.sql import functions as F

        keys = [f"{q}\u0000{p}" for q, p in wanted]
        pdf = (chunk.filter(F.concat_ws("\u0000", "query_id", "product_id").isin(keys))
               .select("query_id", "product_id", "query", "text").toPandas())
        for qid, pid, query, text in zip(pdf["query_id"], pdf["product_id"], pdf["query"], pdf["text"]):
            for name, key in wanted.get((qid, pid), []):
                tier = self.by_name[name]
                body = tier.request_kwargs(tier.messages(query, text))
                if response_key(tier.cfg, body) == key:
                    self.queued.setdefault(name, {})[key] = body

    def submit(self) -> None:
        """One batch per tier of the requests queued in this run; then the given-up requests are marked."""
        for tier in self.tiers:
            bodies = self.queued.pop(tier.name, {})
            if bodies:
                self._submit(tier, bodies)
        if self.gave_up:
            stamp = bs.now()
            bs.put(self.tables, bs.REQUESTS, [
                {"custom_id": k, "tier": n, "settings_key": tier_settings_key(self.by_name[n]), "state": "gave_up",
                 "attempts": 0, "error": self.by_name[n].batch_failed.get(k, (0, None))[1], "updated_at": stamp}
                for k, n in self.gave_up.items()])
            self.stats["gave_up"] += len(self.gave_up)
            self.gave_up = {}

    def _submit(self, tier, bodies: dict[str, dict]) -> None:
        """Write the request JSONL, record the requests and the batch ('submitting'), then send it."""
        sid = uuid.uuid4().hex
        path = jl.write_requests(self.folder / f"{sid}.jsonl", bodies)
        stamp = bs.now()
        tried = tier.batch_failed
        bs.put(self.tables, bs.REQUESTS, [
            {"custom_id": k, "submission_id": sid, "tier": tier.name, "settings_key": tier_settings_key(tier),
             "state": "pending", "attempts": tried.get(k, (0, None))[0] + 1, "error": None, "updated_at": stamp}
            for k in bodies])
        state = "written" if self.cfg.target == "file" else "submitting"
        row = {"submission_id": sid, "batch_id": None, "tier": tier.name, "target": self.cfg.target, "state": state,
               "input_file": str(path), "input_file_id": None, "output_file_id": None, "error_file_id": None,
               "request_count": len(bodies), "created_at": stamp, "updated_at": stamp}
        self._put_batch(row)
        self.pending.update(bodies)
        self.stats["submitted_requests"] += len(bodies)
        self.stats["submitted_batches"].append(sid)
        if self.cfg.target == "file":
            log.info("batch %s (%s): %d requests written to %s for `vllm run-batch`", sid, tier.name, len(bodies), path)
            return
        self._send(tier, row)

    def _send(self, tier, row: dict) -> None:
        """Upload the request file and create the batch, then record the endpoint's ids."""
        client = self._client(tier)
        path = Path(row["input_file"])
        with open(path, "rb") as fh:
            uploaded = client.files.create(file=(path.name, fh), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=jl.URL, completion_window=self.cfg.completion_window,
                                      metadata={"annomine_submission": row["submission_id"]})
        kill_point("created")
        self._put_batch(row, batch_id=batch.id, input_file_id=uploaded.id, state=batch.status)
        log.info("batch %s (%s): %d requests submitted as %s", row["submission_id"], tier.name, row["request_count"], batch.id)
