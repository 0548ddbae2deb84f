"""Local LLM tier throughput: a packaged GGUF model on the managed llama.cpp server, through the tier client.

    python benchmarks/bench_llm_local.py --model smollm2-135m --pairs 40 --n-threads 2
    python benchmarks/bench_llm_local.py --model qwen2.5-coder-1.5b --pairs 40 --n-threads 2 --labels ../shared/data/crowdflower
    python benchmarks/bench_llm_local.py ... --reason yes   # ask for the reason too (a local tier's default: no)
    python benchmarks/bench_llm_local.py ... --compare-stock  # and the same pairs on the stock llama_cpp.server
    python benchmarks/bench_llm_local.py ... --logprobs no     # without log-probabilities (what they cost)

The call path of a `server: local` tier (annomine/judges/local_server.py + `LLMTier.grade_many`: the prompt,
the JSON-schema constraint, log-probabilities), one request at a time (the server answers one at a time).
Pairs are CrowdFlower's labelled (query, product) pairs when `--labels` names the folder (then agreement with
the human grade is reported too), else generated demo-shop pairs. Reports server start-up seconds, pairs/s
after the first request (whose prompt prefix is not cached yet), tokens per pair and the confidence sources,
and the share of llama.cpp's own throughput the client reaches: the same request bodies sent back to back
with plain urllib (no client, no parsing) give the server's pairs/s for these prompts; the tier client's
pairs/s over that is the share of the server's one slot the client keeps busy. With `--compare-stock`, the same
pairs go through llama-cpp-python's stock server too (it computes the logits of every prompt token, annomine's
those of the tokens whose log-probabilities are read: annomine/judges/llama_server.py): pairs/s of each, their
ratio, and whether the grades and distributions agree.
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.request
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annomine.judges.config import LLMTierConfig  # noqa: E402
from annomine.judges.llm import LOOPBACK_KEY, LLMTier  # noqa: E402
from annomine.judges.local_models import resolve_model  # noqa: E402
from annomine.judges.local_server import SERVER_MODULE, STOCK_SERVER_MODULE, LocalLLMServer  # noqa: E402
from common import emit  # noqa: E402


def demo_pairs(n: int) -> tuple[list[tuple[str, str]], list[int] | None]:
    from annomine.demo_shop import generate_products
    from annomine.text import product_text

    rng = random.Random(5)
    products = generate_products(n, rng, seed=5)
    return [(f"{p.brand.lower()} {p.ptype}", product_text(p.title, None, p.description)) for p in products], None


def labelled_pairs(folder: Path, n: int) -> tuple[list[tuple[str, str]], list[int]]:
    from annomine.judges.data import load_pairs_from_files

    df = load_pairs_from_files(folder / "queries.tsv", folder / "labels.tsv", folder / "products.tsv")
    df = df.sample(n=min(n, len(df)), random_state=13)
    return list(zip(df["query"].astype(str), df["text"].astype(str))), df["grade"].astype(int).tolist()


def raw_throughput_seconds(base_url: str, tier: LLMTier, pairs: list[tuple[str, str]]) -> float:
    """Seconds for llama.cpp to answer the tier's exact request bodies sent back to back without the client."""
    from annomine.judges.prompt import build_messages

    bodies = [json.dumps(tier.request_kwargs(build_messages(q, t, tier.grades, tier.cfg.prompt_version))).encode() for q, t in pairs]
    t0 = time.perf_counter()
    for body in bodies:
        req = urllib.request.Request(base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--labels", help="folder with queries.tsv, labels.tsv, products.tsv (CrowdFlower layout)")
    parser.add_argument("--reason", choices=["auto", "yes", "no"], default="auto",
                        help="ask for the reason after the grade (LLMTierConfig.reason; auto: no for a local server)")
    parser.add_argument("--logprobs", choices=["yes", "no"], default="yes",
                        help="ask for the answer tokens' log-probabilities (LLMTierConfig.logprobs; the tier's default: yes)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (the pipeline's: max_concurrency_total)")
    parser.add_argument("--compare-stock", action="store_true",
                        help="grade the same pairs on llama-cpp-python's stock server too and compare")
    args = parser.parse_args()
    reason = {"auto": None, "yes": True, "no": False}[args.reason]
    pairs, truth = labelled_pairs(Path(args.labels), args.pairs + 1) if args.labels else demo_pairs(args.pairs + 1)
    startup, tier, first, results, seconds, raw_seconds = serve_and_grade(SERVER_MODULE, args, reason, pairs)
    ok = [r for r in results if r.grade is not None]
    sources = dict(Counter(str(r.confidence_source) for r in results))
    extra = {"pairs": len(results), "graded": len(ok), "confidence_sources": sources, "n_threads": args.n_threads,
             "reason": tier.cfg.effective_reason, "logprobs": tier.cfg.logprobs, "grade_per_pair": [r.grade for r in results],
             "first_request_s": round(first.latency_ms / 1000.0, 2),
             "prompt_tokens_per_pair": round(sum(r.prompt_tokens for r in ok) / max(len(ok), 1), 1),
             "completion_tokens_per_pair": round(sum(r.completion_tokens for r in ok) / max(len(ok), 1), 1),
             "grades": dict(Counter(r.grade for r in ok))}
    if truth is not None:
        agree = [r.grade == t for r, t in zip(results, truth[1:]) if r.grade is not None]
        extra["exact_agreement_with_humans"] = round(sum(agree) / max(len(agree), 1), 3)
    emit(f"local LLM tier {args.model}, {args.n_threads} threads, through the tier client", round(len(results) / seconds, 3),
         "pairs/s", **extra)
    emit(f"local LLM tier {args.model}: client pairs/s over llama.cpp's own for the same requests (one slot)",
         round(raw_seconds / seconds, 3), "ratio", raw_pairs_per_s=round(len(pairs[1:]) / raw_seconds, 3))
    emit(f"local LLM server start-up ({args.model}, model load included)", round(startup, 1), "s")
    if args.compare_stock:
        compare_stock(args, reason, pairs, results, seconds)


def serve_and_grade(server_module: str, args, reason, pairs):
    """(start-up s, tier, first result, results, seconds, raw seconds): the pairs graded on a fresh server."""
    started = time.perf_counter()
    with LocalLLMServer(resolve_model(args.model), args.model, n_threads=args.n_threads, startup_timeout_s=600,
                        server_module=server_module) as srv:
        startup = time.perf_counter() - started
        cfg = LLMTierConfig(model=args.model, server="local", timeout_s=300, reason=reason, logprobs=args.logprobs == "yes")
        tier = LLMTier("tier2", cfg, [1, 2, 3, 4], srv.base_url, LOOPBACK_KEY)
        first = tier.grade(*pairs[0])  # fills the prompt-prefix cache (the system prompt)
        t0 = time.perf_counter()
        results = tier.grade_many(pairs[1:], args.concurrency)
        seconds = time.perf_counter() - t0
        raw_seconds = raw_throughput_seconds(srv.base_url, tier, pairs[1:])
    return startup, tier, first, results, seconds, raw_seconds


def compare_stock(args, reason, pairs, results, seconds) -> None:
    _, _, _, stock, stock_seconds, _ = serve_and_grade(STOCK_SERVER_MODULE, args, reason, pairs)
    diffs = [abs(a.probs[g] - b.probs[g]) for a, b in zip(results, stock) if a.probs and b.probs for g in a.probs]
    emit(f"local LLM tier {args.model}, {args.n_threads} threads: annomine's server over the stock llama_cpp.server",
         round(stock_seconds / seconds, 3), "x", stock_pairs_per_s=round(len(stock) / stock_seconds, 3),
         pairs_per_s=round(len(results) / seconds, 3), same_grades=[a.grade for a in results] == [b.grade for b in stock],
         max_prob_difference=max(diffs, default=None))


if __name__ == "__main__":
    main()
