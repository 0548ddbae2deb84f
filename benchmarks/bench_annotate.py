"""LLM-tier grading throughput against the loopback OpenAI-compatible server at a set latency.

The call path of the annotate stage's tiers 2-3 (`annomine.judges.llm.LLMTier.grade_many`: the
`openai` client, bounded concurrency, retries with backoff), over real HTTP on 127.0.0.1. Reports
pairs/s, the share of the allowed concurrency kept busy (achieved in-flight requests / cap) and LLM
calls per pair (duplicates in the batch are sent once), with and without injected faults.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annomine.demo_shop import generate_products  # noqa: E402
from annomine.judges.config import LLMTierConfig  # noqa: E402
from annomine.judges.llm import LLMTier  # noqa: E402
from annomine.text import product_text  # noqa: E402
from common import Timer, emit  # noqa: E402
from jobs.llm_server import LoopbackLLMServer  # noqa: E402


def make_pairs(n: int, duplicate_share: float) -> list[tuple[str, str]]:
    rng = random.Random(5)
    products = generate_products(n, rng, seed=5)
    pairs = [(f"{p.brand.lower()} {p.ptype}", product_text(p.title, None, p.description)) for p in products]
    n_dupes = int(n * duplicate_share)
    return pairs[: n - n_dupes] + rng.sample(pairs[: n - n_dupes], n_dupes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duplicate-share", type=float, default=0.1)
    args = parser.parse_args()
    pairs = make_pairs(args.pairs, args.duplicate_share)
    for label, faults in (("no faults", None), ("faults 429=5%,500=5%,malformed=5%", "429=0.05,500=0.05,malformed=0.05")):
        with LoopbackLLMServer(latency_ms=args.latency_ms, faults=faults, retry_after_s=0.2) as server:
            tier = LLMTier("tier2", LLMTierConfig(model="rule-small", max_attempts=4, timeout_s=10), [1, 2, 3, 4], server.base_url, "unused")
            with Timer() as t:
                results = tier.grade_many(pairs, concurrency=args.concurrency)
            requests = server.stats.get("requests", 0)
        graded = sum(1 for r in results if r.grade is not None)
        ideal = args.concurrency * (args.latency_ms / 1000.0)  # requests in flight x time each = work per second at the cap
        rate = requests / t.seconds
        emit(f"LLM tier grading at {args.latency_ms:.0f} ms latency, concurrency {args.concurrency}, {label}",
             round(len(pairs) / t.seconds, 1), "pairs/s", graded=graded, pairs=len(pairs))
        emit(f"share of allowed concurrency kept busy ({label})", round(min(1.0, rate * args.latency_ms / 1000.0 / args.concurrency), 3),
             "fraction", ideal_requests_per_s=round(ideal / (args.latency_ms / 1000.0) if args.latency_ms else 0, 1))
        emit(f"LLM calls per pair, {args.duplicate_share:.0%} duplicate pairs ({label})", round(requests / len(pairs), 3), "calls/pair")


if __name__ == "__main__":
    main()
