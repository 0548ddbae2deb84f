"""Typed settings of the judge cascade (shared by the `judge:` and `annotate:` config sections)."""

from __future__ import annotations

from dataclasses import dataclass, field

from annomine.bounds import bounded


@dataclass
class LLMTierConfig:
    """One OpenAI-compatible chat endpoint. The key is read from `api_key_env` (or a Databricks secret
    scope), never from the config itself; a loopback base_url needs no key."""

    model: str
    # Empty with `loopback: {embedded: true}` (the loopback test server) or `server: local`.
    base_url: str | None = None
    # `local`: a llama.cpp server the job starts itself for `model`, a registered local model
    # (annomine/judges/local_models.py: smollm2-135m, qwen2.5-coder-1.5b) or a path to a .gguf file.
    server: str | None = None
    # Local server only: threads, context length, and how long it may take to load the model.
    n_threads: int = bounded(2, ge=1)
    n_ctx: int = bounded(2048, ge=256)
    startup_timeout_s: float = bounded(180.0, gt=0)
    api_key_env: str | None = None
    secret_scope: str | None = None
    secret_key: str | None = None
    prompt_version: str = "v1"
    temperature: float = bounded(0.0, ge=0)
    max_tokens: int = bounded(96, ge=1)
    timeout_s: float = bounded(30.0, gt=0)
    # Each retry after a timeout waits this many times longer (empty: 2 for `server: local`, whose answers
    # slow down with the machine's load and whose retry restarts the generation; 1, a fixed timeout, otherwise).
    timeout_growth: float | None = bounded(None, ge=1)
    max_attempts: int = bounded(4, ge=1)
    backoff_base_s: float = bounded(0.5, ge=0)
    backoff_max_s: float = bounded(20.0, ge=0)
    # Ask for token log-probabilities (confidence from the grade token's distribution).
    logprobs: bool = True
    # Alternatives per token asked for with logprobs (OpenAI allows at most 20).
    top_logprobs: int = bounded(10, ge=1, le=20)
    # Constrain the answer to the grade JSON: `json_schema` (OpenAI, vLLM), `json_object` (a schema in
    # llama.cpp's json_object form) or `none`; empty: json_object for `server: local`, json_schema otherwise.
    response_format: str | None = None
    # Ask for the short reason after the grade. Empty: no for `server: local`, yes otherwise. The grade is written
    # first and the prompt is the same, so its token and distribution do not depend on this; but llama-cpp-python
    # sorts the whole vocabulary in Python for every answer token it returns log-probabilities for (~0.3 s a token
    # on 2 cores), and the ~20-token reason more than doubles a local grade's time (docs/benchmarks.md).
    reason: bool | None = None
    # Requests this tier keeps open per worker process (empty: the cascade's share; a local server
    # answers one request at a time, so it defaults to 1 there).
    max_concurrency: int | None = bounded(None, ge=1)
    # Confidence when the endpoint gives no log-probabilities (stated in tier_outputs as 'fallback').
    fallback_confidence: float = bounded(0.7, ge=0, le=1)
    # Escalation threshold while the tier has no calibration of its own.
    default_threshold: float = bounded(0.8, ge=0, le=1)
    # Extra HTTP headers (non-secret) sent with every request.
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Price in USD per million prompt (input) and completion (output) tokens. Empty: 0 for `server: local` and the
    # embedded loopback server; a tier on another endpoint without prices is reported unpriced (no money forecast,
    # and `annotate.max_cost` refuses it).
    input_usd_per_mtok: float | None = bounded(None, ge=0)
    output_usd_per_mtok: float | None = bounded(None, ge=0)
    # Share the endpoint's batch API takes off both prices (OpenAI: 0.5); the summaries and forecasts state what the
    # same requests would cost there (`usd_if_batch`).
    batch_discount: float = bounded(0.0, ge=0, lt=1)

    def validate(self) -> None:
        if self.server not in (None, "local"):
            raise ValueError(f"server must be 'local' or empty, got {self.server!r}")
        if self.server == "local" and self.base_url:
            raise ValueError("server: local starts its own endpoint: leave base_url empty")
        if self.response_format not in (None, "json_schema", "json_object", "none"):
            raise ValueError(f"response_format must be json_schema, json_object or none, got {self.response_format!r}")

    @property
    def effective_response_format(self) -> str:
        return self.response_format or ("json_object" if self.server == "local" else "json_schema")

    @property
    def effective_reason(self) -> bool:
        return self.reason if self.reason is not None else self.server != "local"

    @property
    def effective_timeout_growth(self) -> float:
        return self.timeout_growth or (2.0 if self.server == "local" else 1.0)

    def timeout_for(self, timeouts_so_far: int) -> float:
        """The request timeout after `timeouts_so_far` timed-out attempts of the same pair."""
        return self.timeout_s * self.effective_timeout_growth ** timeouts_so_far

    @property
    def effective_max_concurrency(self) -> int | None:
        return self.max_concurrency or (1 if self.server == "local" else None)


@dataclass
class LoopbackConfig:
    """The loopback OpenAI-compatible test server (annomine/judges/loopback_server.py; tests and the demo)."""

    # Start it in this process for every tier without a base_url (stopped when the cascade closes).
    embedded: bool = False
    # Added to every request.
    latency_ms: float = bounded(0.0, ge=0)
    # Injected faults, e.g. '429=0.1,500=0.05,slow=0.05' (kinds: 429, 500, slow, malformed, truncated, garbage, 401).
    faults: str = ""
    # Extra delay of a 'slow' fault.
    slow_ms: float = bounded(3000.0, ge=0)
    # Retry-After seconds sent with a 429.
    retry_after_s: float = bounded(1.0, ge=0)
    # Seed of the fault draws.
    seed: int = 0


@dataclass
class CascadeConfig:
    # Tier-1 judge: a folder or version id; empty = <warehouse>/judges/current.json.
    judge: str | None = None
    tier1: bool = True
    tier2: LLMTierConfig | None = None
    tier3: LLMTierConfig | None = None
    # The loopback test server, started in-process for tiers without base_url when `embedded`.
    loopback: LoopbackConfig = field(default_factory=LoopbackConfig)
    # Concurrent LLM requests for the whole job (split across partitions / workers).
    max_concurrency_total: int = bounded(16, ge=1)
    tier1_batch_size: int = bounded(64, ge=1)
    # Decide escalated pairs with the fitted combination of every consulted tier's grade distribution
    # (annomine/judges/combiner.py; fitted by `annomine judge calibrate`, kept only when it beats the first
    # tier alone). Without one, or with false, the first tier decides every pair and LLM grades are recorded only.
    combine: bool = True

    def validate(self) -> None:
        if not (self.tier1 or self.tier2 or self.tier3):
            raise ValueError("at least one tier must be enabled")
        for name in ("tier2", "tier3"):
            tier = getattr(self, name)
            if tier is not None and not tier.base_url and tier.server != "local" and not self.loopback.embedded:
                raise ValueError(f"{name}.base_url is empty, {name}.server is not 'local' and loopback.embedded is not true")


@dataclass
class BatchConfig:
    """How `annotate.mode: batch` sends and collects its requests (annomine/judges/batch.py)."""

    # `openai`: upload the request JSONL and create the batch through the endpoint's Files and Batches API;
    # `file`: only write it under <warehouse>/llm_batches/ (for `vllm run-batch`), collected from `results`.
    target: str = "openai"
    # Output JSONL of `vllm run-batch` (result lines of the `file` batches) to collect; also `annotate --batch-results`.
    results: str | None = None
    # Poll unfinished batches this long before the run returns (0: look once).
    wait_s: float = bounded(0.0, ge=0)
    # Seconds between two polls while waiting.
    poll_s: float = bounded(30.0, gt=0)
    # The batch's completion window (OpenAI accepts 24h).
    completion_window: str = "24h"

    def validate(self) -> None:
        if self.target not in ("openai", "file"):
            raise ValueError(f"batch.target must be 'openai' or 'file', got {self.target!r}")
