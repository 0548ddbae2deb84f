"""The relevance judge cascade: a local cross-encoder (tier 1) and OpenAI-compatible LLM tiers (2, 3).

- `cross_encoder`: the tier-1 model, its training loop and versioned save/load.
- `stack`: tier 1's stacked head (its grade distribution plus cheap evidence such as term coverage).
- `calibration`: per-class isotonic calibration of a tier's confidence and escalation thresholds.
- `combiner`: the calibrated combination of the grade distributions of the tiers a pair consulted.
- `cascade`: escalation from tier to tier, applied to a pandas frame of pairs.
- `prompt`: the versioned grading prompt (product text delimited as data).
- `llm`: the OpenAI-client tier (JSON output, log-prob confidence, retries with backoff).
- `local_models`, `local_server`: packaged GGUF models and the llama.cpp server a `server: local` tier runs.
- `loopback_server`: a fake OpenAI-compatible rule server, the LLM tiers' test double (`annomine fake-llm-server`).
- `ranking`: whether a judge can teach ranking (its order of labelled products against the starting retriever's).
- `store`: where judges live and the `current.json` pointer.
- `config`: the cascade's typed settings (tiers, the loopback server, concurrency).
- `data`: labelled pairs from files or tables; grading metrics (agreement, QWK, confusion).
"""
