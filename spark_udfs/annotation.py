"""The annotate job's call path inside Spark: an iterator-form function for `mapInPandas`.

The cascade (tier-1 model folder, LLM tier settings with the key resolved on the driver,
calibrators) is captured in the closure; on the worker each LLM client is built lazily, the
tier-1 model is loaded once per process, and each Arrow batch is graded with the batch's pairs
de-duplicated and at most `concurrency` LLM requests in flight (the job sets it to
`max_concurrency_total // partitions`). A pair that a tier failed on comes back with a null grade
and the error; the function never raises for one bad pair. `attempts` is the input's
`prior_attempts` (runs that tried the pair before) plus one; `content_hash` is the input's (what the pair's
grade was given for, annomine/graded_content.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
from pyspark.sql import types as T

from annomine.schemas import ANNOTATIONS

EXTRA_FIELDS = [T.StructField("n_tiers", T.IntegerType(), True), T.StructField("llm_calls", T.IntegerType(), True),
                T.StructField("llm_requests", T.IntegerType(), True)]


def output_schema() -> T.StructType:
    """The annotations schema plus three run statistics (tiers consulted, LLM tier calls, LLM HTTP attempts)."""
    return T.StructType(list(ANNOTATIONS.schema.fields) + EXTRA_FIELDS)


def to_annotation_rows(graded: pd.DataFrame, judge_version: str, annotated_at: pd.Timestamp | None = None) -> pd.DataFrame:
    """Typed annotation rows (nullable ints) from `Cascade.grade_frame` output."""
    out = pd.DataFrame({
        "query_id": graded["query_id"].astype(str),
        "product_id": graded["product_id"].astype(str),
        "judge_version": judge_version,
        "grade": pd.array([None if pd.isna(g) else int(g) for g in graded["grade"]], dtype="Int32"),
        "confidence": pd.array([None if pd.isna(c) else float(c) for c in graded["confidence"]], dtype="Float64"),
        "deciding_tier": graded["deciding_tier"].astype(object),
        "tier_outputs": graded["tier_outputs"].astype(str),
        "latency_ms": graded["latency_ms"].astype(float),
        "prompt_tokens": pd.array(graded["prompt_tokens"].astype("int64"), dtype="Int64"),
        "completion_tokens": pd.array(graded["completion_tokens"].astype("int64"), dtype="Int64"),
        "error": graded["error"].astype(object),
        "annotated_at": annotated_at or pd.Timestamp.now(tz="UTC").tz_localize(None),
        "attempts": pd.array(graded["prior_attempts"].fillna(0).astype("int64") + 1 if "prior_attempts" in graded
                             else [1] * len(graded), dtype="Int32"),
        "escalation": graded["escalation"].astype(object) if "escalation" in graded else None,
        "content_hash": graded["content_hash"].astype(object) if "content_hash" in graded else None,
        "n_tiers": pd.array(graded["n_tiers"].astype("int64"), dtype="Int32"),
        "llm_calls": pd.array(graded["llm_calls"].astype("int64"), dtype="Int32"),
        "llm_requests": pd.array(graded["llm_requests"].astype("int64"), dtype="Int32"),
    })
    return out


def make_annotator(cascade, judge_version: str, concurrency: int,
                   llm_budget: int | None = None) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """`df.mapInPandas(make_annotator(...), output_schema())` over (query_id, product_id, query, text, content_hash).

    `llm_budget`: LLM tier calls this function may make over all its batches (the least confident pairs of
    each batch first); the job runs a budgeted chunk as one partition, so that is the chunk's budget."""

    def annotate(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        remaining = llm_budget
        for pdf in batches:
            if pdf.empty:
                continue
            graded = cascade.grade_frame(pdf, concurrency=concurrency, llm_budget=remaining)
            if remaining is not None:
                remaining = max(0, remaining - int(graded["llm_calls"].sum()))
            yield to_annotation_rows(graded, judge_version)

    return annotate
