"""LLM-tier grading throughput against the loopback OpenAI-compatible server, run in its own process.

The call path of the annotate stage's tiers 2-3 (`annomine.judges.llm.LLMTier.grade_many`: the
`openai` client, bounded concurrency, retries with backoff), over real HTTP on 127.0.0.1 to
`annomine fake-llm-server` started as a separate process (so the server does not share this process's GIL).
Reports pairs/s, the share of the allowed concurrency kept busy and LLM calls per pair (duplicates in
the batch are sent once), without and with injected faults.

Busy share = request-seconds the server spent on this client's requests (its `/stats` busy_seconds)
/ (concurrency cap x the client's wall time of `grade_many`): 1.0 means every allowed slot had a
request open for the whole call, including the ramp-up and the tail where fewer pairs than slots remain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from annomine.demo_shop import generate_products  # noqa: E402
from annomine.judges.config import LLMTierConfig  # noqa: E402
from annomine.judges.llm import LOOPBACK_KEY, LLMTier  # noqa: E402
from annomine.text import product_text  # noqa: E402
from common import Timer, emit  # noqa: E402

FAULT_MIX = "429=0.05,500=0.05,malformed=0.05"


def make_pairs(n: int, duplicate_share: float) -> list[tuple[str, str]]:
    rng = random.Random(5)
    products = generate_products(n, rng, seed=5)
    pairs = [(f"{p.brand.lower()} {p.ptype}", product_text(p.title, None, p.description)) for p in products]
    n_dupes = int(n * duplicate_share)
    return pairs[: n - n_dupes] + rng.sample(pairs[: n - n_dupes], n_dupes)


@contextlib.contextmanager
def loopback_process(latency_ms: float, faults: str, retry_after_s: float):
    """`annomine fake-llm-server` in a child process on a free port; yields its base URL; stopped on exit."""
    cmd = [sys.executable, "-m", "jobs.fake_llm_server", "--port", "0", "--latency-ms", str(latency_ms),
           "--faults", faults, "--retry-after", str(retry_after_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"loopback server did not start: {line!r}")
        yield line.split(" on ", 1)[1].split(" ", 1)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def server_stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duplicate-share", type=float, default=0.1)
    args = parser.parse_args()
    pairs = make_pairs(args.pairs, args.duplicate_share)
    for label, faults in (("no faults", ""), (f"faults {FAULT_MIX}", FAULT_MIX)):
        with loopback_process(args.latency_ms, faults, retry_after_s=0.2) as base_url:
            tier = LLMTier("tier2", LLMTierConfig(model="rule-small", max_attempts=4, timeout_s=10), [1, 2, 3, 4],
                           base_url, LOOPBACK_KEY)
            tier.grade(*pairs[0])  # builds the client once, as a job does before its thousands of pairs
            before = server_stats(base_url)
            with Timer() as t:
                results = tier.grade_many(pairs, concurrency=args.concurrency)
            after = server_stats(base_url)
        requests = after["requests"] - before["requests"]
        busy = (after["busy_seconds"] - before["busy_seconds"]) / (args.concurrency * t.seconds)
        graded = sum(1 for r in results if r.grade is not None)
        emit(f"LLM tier grading at {args.latency_ms:.0f} ms latency, concurrency {args.concurrency}, {label}",
             round(len(pairs) / t.seconds, 1), "pairs/s", graded=graded, pairs=len(pairs), seconds=round(t.seconds, 2))
        emit(f"share of allowed concurrency kept busy, server in its own process ({label})", round(busy, 3), "fraction",
             in_flight_max=after["in_flight_max"], target=0.95 if not faults else 0.85)
        emit(f"LLM calls per pair, {args.duplicate_share:.0%} duplicate pairs ({label})", round(requests / len(pairs), 3),
             "calls/pair")


if __name__ == "__main__":
    main()
