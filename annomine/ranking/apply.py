"""Ranked lists for any queries: a published ranker over its retriever's top-K, or tier 1 alone over a top-K.

Both build what they need from the catalog and the query text only (`annomine.ranking.features`), so an
unseen query (a held-out one, an outside file's) is ranked exactly as a training query would be.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.evaluation.catalog import Catalog, EncodeSettings, ModelSpec
from annomine.ranking.features import FeatureSettings, FeatureSources, build_features
from annomine.ranking.model import rerank
from annomine.ranking.store import PublishedRanker
from annomine.ranking.tier1 import Tier1Scores


def retriever_spec(published: PublishedRanker) -> ModelSpec:
    """The dense retriever the ranker was trained over (its own copy of the path, not a pointer that may move)."""
    entry = published.meta["retriever"]
    path = published.path_of("retriever_path")
    if entry["kind"] != "minilm" and (path is None or not path.exists()):
        from annomine.errors import MissingInputError

        raise MissingInputError(f"{published.folder}: the ranker's retriever {path} does not exist")
    return ModelSpec(entry.get("label", "retriever"), entry["kind"], entry.get("source", entry["kind"]),
                     path=str(path) if path else None)


def feature_settings(published: PublishedRanker) -> FeatureSettings:
    return FeatureSettings(**published.meta["features"])


class RankedLists:
    """A published ranker ready to rank query texts: the catalog's indexes are built once and reused."""

    def __init__(self, published: PublishedRanker, variant: str, catalog: Catalog, encode: EncodeSettings,
                 embeddings_cache: Path | None, tier1_cache: Path | None, spark=None, stored=None):
        self.published, self.variant = published, variant
        self.ranker = published.model(variant)
        self.tier1 = Tier1Scores(published.path_of("judge_path"), tier1_cache)
        self.sources = FeatureSources(catalog, retriever_spec(published), self.tier1, encode, embeddings_cache, spark, stored)
        self.settings = feature_settings(published)

    def rank(self, query_texts: list[str], segments: list | None = None) -> tuple[list[list[str]], dict]:
        """The ranked top-K per query text, and facts about the run (timings, pairs tier 1 scored)."""
        started, scored = time.perf_counter(), self.tier1.scored
        ids = [f"q{i}" for i in range(len(query_texts))]
        segment_of = dict(zip(ids, segments)) if segments is not None else None
        frame = build_features(self.sources, ids, list(query_texts), self.settings, segment_of)
        featured = time.perf_counter()
        ranked = rerank(frame, self.ranker.score(frame)) if len(frame) else {}
        meta = self.published.meta
        info = {"retriever": f"ranked: {self.variant} (LambdaMART over {meta['retriever'].get('label')}'s top "
                             f"{meta['features']['top_k']})",
                "ranker": str(self.published.folder), "features_s": round(featured - started, 2),
                "rerank_s": round(time.perf_counter() - featured, 3), "tier1_scored_pairs": self.tier1.scored - scored}
        return [ranked.get(q, []) for q in ids], info


def rank_with(published: PublishedRanker, variant: str, catalog: Catalog, query_texts: list[str],
              encode: EncodeSettings, embeddings_cache: Path | None, tier1_cache: Path | None,
              segments: list | None = None, spark=None, stored=None) -> tuple[list[list[str]], dict]:
    """The ranked top-K per query text, and facts about the run."""
    lists = RankedLists(published, variant, catalog, encode, embeddings_cache, tier1_cache, spark, stored)
    return lists.rank(query_texts, segments)


def ce_rerank(lists: list[list[str]], catalog: Catalog, query_texts: list[str], judge_folder: Path,
              tier1_cache: Path | None) -> tuple[list[list[str]], dict]:
    """Each list reordered by tier 1's expected grade (ties keep the list's order): the cross-encoder rerank."""
    started = time.perf_counter()
    tier1 = Tier1Scores(judge_folder, tier1_cache)
    text_of = dict(zip(catalog.ids, catalog.texts))
    frame = pd.DataFrame([(f"q{i}", q, pid, text_of.get(pid, "")) for i, (q, ids) in enumerate(zip(query_texts, lists))
                          for pid in ids], columns=["query_id", "query", "product_id", "text"])
    if frame.empty:
        return [[] for _ in lists], {"ce_rerank_s": 0.0}
    expected = tier1.probs(frame["query"].tolist(), frame["text"].tolist()) @ np.asarray(tier1.grades, dtype=float)
    ranked = rerank(frame, expected)
    return [ranked.get(f"q{i}", []) for i in range(len(lists))], {
        "reranker": f"tier 1 expected grade ({tier1.version})", "tier1_scored_pairs": tier1.scored,
        "ce_rerank_s": round(time.perf_counter() - started, 2)}
