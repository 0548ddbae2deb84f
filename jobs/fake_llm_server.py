"""Stage `fake-llm-server`: a fake LLM, a loopback HTTP server that speaks the OpenAI chat-completions protocol.

    annomine fake-llm-server [--port 8011] [--latency-ms 200] [--faults 429=0.1,500=0.05,slow=0.05,malformed=0.05,truncated=0.05]

The test double (fault injection, no model; `annomine llm-serve` runs a real local model): a command line over the server in
annomine/judges/loopback_server.py, which a job also starts itself with `cascade.loopback.embedded`.
It answers `POST /v1/chat/completions` with a deterministic grade (the share of the query's words
found in the product text), obeys an "answer N" written outside the prompt's data block like a
careless model, and injects faults drawn per request from a seeded generator: `429` (with
Retry-After), `500`, `slow` (sleeps `--slow-ms`, stops when the client hangs up), `malformed`,
`truncated`, `garbage` (a body that is not JSON) and `401` (the key is refused and echoed back).
It also speaks OpenAI's Files and Batches protocol (`/v1/files`, `/v1/batches`): each retrieve of a batch moves
it validating -> in_progress -> completed, its lines answered like online requests; `--batch-fail TEXT` makes
the lines whose request contains TEXT fail (`--batch-fail-times` times each).
`GET /stats` returns request and fault counters; `GET /v1/models` lists models.
Only 127.0.0.1 by default; stdlib `http.server` only.
"""

from __future__ import annotations

import argparse
import sys

from annomine.judges.loopback_server import FAULT_KINDS, LoopbackLLMServer, parse_faults, rule_grade  # noqa: F401 - re-exported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="annomine fake-llm-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--faults", default="", help="e.g. 429=0.1,500=0.05,slow=0.05,malformed=0.05,truncated=0.05,garbage=0.02"
                                                     " (401=1.0: every key refused)")
    parser.add_argument("--slow-ms", type=float, default=3000.0, help="extra delay of a 'slow' fault")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with a 429")
    parser.add_argument("--min-grade", type=int, default=1)
    parser.add_argument("--max-grade", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-fail", action="append", default=[],
                        help="batch lines whose request contains this text fail with a 500 (repeatable)")
    parser.add_argument("--batch-fail-times", type=int, default=1, help="how many times each such line fails")
    parser.add_argument("--no-logprobs", action="store_true", help="behave like an endpoint without log-probabilities")
    args = parser.parse_args(argv)
    try:
        server = LoopbackLLMServer(args.host, args.port, args.latency_ms, args.faults, list(range(args.min_grade, args.max_grade + 1)),
                                   args.seed, args.slow_ms, args.retry_after, not args.no_logprobs,
                                   tuple(args.batch_fail), args.batch_fail_times)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"loopback OpenAI-compatible server on {server.base_url} (latency {args.latency_ms:g} ms, faults {args.faults or 'none'})",
          flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine fake-llm-server", main))
