"""The relevance judge cascade: a local cross-encoder (tier 1) and OpenAI-compatible LLM tiers (2, 3).

- `cross_encoder`: the tier-1 model, its training loop and versioned save/load.
- `calibration`: per-class isotonic calibration of a tier's confidence and escalation thresholds.
- `prompt`: the versioned grading prompt (product text delimited as data).
- `llm`: the OpenAI-client tier (JSON output, log-prob confidence, retries with backoff).
- `cascade`: escalation and majority vote, applied to a pandas frame of pairs.
- `config`: the cascade's typed settings (tiers, the loopback server, concurrency).
- `loopback_server`: the loopback OpenAI-compatible server, the LLM tiers' test double (`annomine llm-server`).
- `data`: labelled pairs from files or tables; grading metrics (agreement, QWK, confusion).
"""
