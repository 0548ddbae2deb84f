"""The stages, defined once: the CLI, the config's known sections and the pipeline derive from this list."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    description: str
    # The stage reads a config section of its own name.
    has_section: bool = True


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "jobs.ingest", "products, queries, labels (and users' retrieval logs) into bronze Delta tables"),
    Stage("channels", "jobs.channels", "run the lexical, BM25 and ANN channels into retrieval_logs"),
    Stage("mine", "jobs.mine", "set logic over the channels into five difficulty levels"),
    Stage("judge", "jobs.judge", "train / evaluate / calibrate the relevance judge cascade"),
    Stage("annotate", "jobs.annotate", "grade mined candidates with the judge cascade"),
    Stage("curriculum", "jobs.curriculum", "per-stage training sets as Delta tables and Parquet shards"),
    Stage("train", "jobs.train", "train the two-tower retriever through the curriculum"),
    Stage("rank", "jobs.rank", "a LambdaMART ranker over the retriever's top-K, labelled by the judge, chosen on dev"),
    Stage("evaluate", "jobs.evaluate", "FAISS retrieval + NDCG@10 on human labels, against baselines"),
    Stage("pipeline", "jobs.pipeline", "every stage in order, skipping those whose outputs are current", has_section=False),
    Stage("fake-llm-server", "jobs.fake_llm_server", "a fake OpenAI-compatible rule server, no model (the LLM tiers' test double)", has_section=False),
    Stage("llm-serve", "jobs.llm_serve", "a local llama.cpp server for a packaged model (smollm2-135m, qwen2.5-coder-1.5b)",
          has_section=False),
    Stage("sql", "annomine.sql_runner", "create the curated views and run the example queries in sql/", has_section=False),
)

BY_NAME = {stage.name: stage for stage in STAGES}

# Top-level keys a config file may have: `project`, one section per stage, and `x-...` keys that only
# hold YAML anchors for the sections to share.
CONFIG_SECTIONS: tuple[str, ...] = ("project", *(s.name for s in STAGES if s.has_section))
ANCHOR_PREFIX = "x-"
