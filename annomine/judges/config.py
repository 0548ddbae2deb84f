"""Typed settings of the judge cascade (shared by the `judge:` and `annotate:` config sections)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LLMTierConfig:
    """One OpenAI-compatible chat endpoint. The key is read from `api_key_env` (or a Databricks secret
    scope), never from the config itself; a loopback base_url needs no key."""

    model: str
    # Empty with `loopback: {embedded: true}`: the loopback server the job starts itself.
    base_url: str | None = None
    api_key_env: str | None = None
    secret_scope: str | None = None
    secret_key: str | None = None
    prompt_version: str = "v1"
    temperature: float = 0.0
    max_tokens: int = 96
    timeout_s: float = 30.0
    max_attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    # Ask for token log-probabilities (confidence from the grade token's distribution).
    logprobs: bool = True
    # Confidence when the endpoint gives no log-probabilities (stated in tier_outputs as 'fallback').
    fallback_confidence: float = 0.7
    # Escalation threshold while the tier has no calibration of its own.
    default_threshold: float = 0.8
    # Extra HTTP headers (non-secret) sent with every request.
    extra_headers: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.fallback_confidence <= 1.0:
            raise ValueError("fallback_confidence must be in [0, 1]")


@dataclass
class LoopbackConfig:
    """The loopback OpenAI-compatible test server (annomine/judges/loopback_server.py; tests and the demo)."""

    # Start it in this process for every tier without a base_url (stopped when the cascade closes).
    embedded: bool = False
    # Added to every request.
    latency_ms: float = 0.0
    # Injected faults, e.g. '429=0.1,500=0.05,slow=0.05' (kinds: 429, 500, slow, malformed, truncated, garbage, 401).
    faults: str = ""
    # Extra delay of a 'slow' fault.
    slow_ms: float = 3000.0
    # Retry-After seconds sent with a 429.
    retry_after_s: float = 1.0
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
    max_concurrency_total: int = 16
    tier1_batch_size: int = 64

    def validate(self) -> None:
        if not (self.tier1 or self.tier2 or self.tier3):
            raise ValueError("at least one tier must be enabled")
        if self.max_concurrency_total < 1:
            raise ValueError("max_concurrency_total must be >= 1")
        for name in ("tier2", "tier3"):
            tier = getattr(self, name)
            if tier is not None and not tier.base_url and not self.loopback.embedded:
                raise ValueError(f"{name}.base_url is empty and loopback.embedded is not true")
