"""The ranker's features for a query's top-K candidates: one builder for training and for unseen queries.

Everything is computed from the catalog, the query text and the trained models, never read from a label or
log table, so a query nobody has seen (a held-out query, an outside file's query) gets its features the same
way a training query does:
- `retriever`: the dense retriever's cosine and rank (the candidates are its top `top_k`);
- `bm25`: the BM25 score of the product text for the query and its rank in BM25's top `channel_k`;
- `channels`: the rank in the other channels' top `channel_k` (`lexical`: the dictionary matcher over titles,
  `ann`: zero-shot MiniLM) and MiniLM's cosine; a product a channel did not retrieve has a missing rank;
- `ce`: tier 1's grade distribution and expected grade (`annomine.ranking.tier1`);
- `coverage`: the share of the query's terms in the title and in the whole text (the judge stack's features);
- `query`: the query's number of terms and its segment (head 0, torso 1, tail 2; missing when unknown);
- `llm`: the LLM tiers' expected grades, where the caller passes them (missing otherwise);
- `engagement`: numeric catalog columns, where the caller passes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.evaluation.catalog import Catalog, EncodeSettings, ModelSpec, catalog_embeddings, worker_encoder
from annomine.judges.stack import coverage, title_of, tokens

log = logging.getLogger(__name__)

GROUPS = ("retriever", "bm25", "channels", "ce", "coverage", "query", "llm", "engagement")
DEFAULT_GROUPS = ("retriever", "bm25", "channels", "ce", "coverage", "query", "engagement")
FIXED_COLUMNS = {
    "retriever": ["retriever_score", "retriever_rank"],
    "bm25": ["bm25_score", "bm25_rank"],
    "channels": ["lexical_rank", "ann_rank", "ann_score"],
    "coverage": ["title_coverage", "text_coverage"],
    "query": ["query_terms", "query_segment"],
    "llm": ["tier2_expected", "tier3_expected"],
}
SEGMENT_CODES = {"head": 0, "torso": 1, "tail": 2}
ZERO_SHOT = ModelSpec("minilm", "minilm", "minilm")


@dataclass
class FeatureSettings:
    # Candidates per query: the retriever's top K.
    top_k: int = 100
    # How deep each other channel (bm25, lexical, ann) retrieves; a candidate below that has a missing rank.
    channel_k: int = 100
    # Feature groups (see the module doc); `llm` is off by default: unseen queries have no LLM grades.
    groups: list[str] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    # Numeric catalog columns of the `engagement` group (used when the catalog has them).
    engagement_columns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.top_k < 10:
            raise ValueError("top_k must be >= 10 (NDCG@10 needs ten results)")
        if self.channel_k < 1:
            raise ValueError("channel_k must be >= 1")
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown feature group(s) {unknown}; groups: {list(GROUPS)}")


@dataclass
class FeatureSources:
    """What the features are computed from: the catalog, the retriever, tier 1 and how to encode."""

    catalog: Catalog
    retriever: ModelSpec
    tier1: object  # annomine.ranking.tier1.Tier1Scores
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    cache_dir: Path | None = None
    spark: object = None
    stored: object = None
    _lexical: object = None

    @property
    def lexical(self):
        if self._lexical is None:
            from annomine.retrievers.lexical import LexicalRetriever

            self._lexical = LexicalRetriever(self.catalog.ids, [title_of(t) for t in self.catalog.texts])
        return self._lexical


def columns_of(groups, grades: list[int], engagement_columns=()) -> list[str]:
    """The feature columns of `groups`, in a fixed order."""
    out = []
    for group in GROUPS:
        if group not in groups:
            continue
        if group == "ce":
            out += [f"ce_p{j + 1}" for j in range(len(grades))] + ["ce_expected"]
        elif group == "engagement":
            out += [f"eng_{c}" for c in engagement_columns]
        else:
            out += FIXED_COLUMNS[group]
    return out


def dense_scores(spec: ModelSpec, sources: FeatureSources, queries: list[str]) -> np.ndarray:
    """(n_queries, n_products) cosine of each query with every product, for a dense spec."""
    items, _ = catalog_embeddings(spec, sources.catalog, sources.encode, sources.cache_dir, spark=sources.spark,
                                  stored=sources.stored)
    encoder = worker_encoder(spec.kind, spec.path, sources.encode)
    vectors = np.asarray(encoder.encode_queries(list(queries), batch_size=sources.encode.batch_size), dtype=np.float32)
    return vectors @ np.asarray(items, dtype=np.float32).T


def top_positions(scores: np.ndarray, k: int, positive_only: bool = False) -> np.ndarray:
    """Row positions of the k best scores, best first (ties: catalog order)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return order[scores[order] > 0] if positive_only else order


def rank_lookup(positions, n: int) -> np.ndarray:
    """Rank (1-based) per catalog row of the given top positions; NaN for a row not among them."""
    ranks = np.full(n, np.nan)
    ranks[np.asarray(positions, dtype=int)] = np.arange(1, len(positions) + 1)
    return ranks


def candidates(sources: FeatureSources, query_ids: list[str], queries: list[str], settings: FeatureSettings) -> pd.DataFrame:
    """The retriever's top-K per query with the channel features (retriever, bm25, channels groups)."""
    catalog, n = sources.catalog, len(sources.catalog)
    retriever = dense_scores(sources.retriever, sources, queries)
    zero_shot = retriever if sources.retriever.kind == "minilm" else dense_scores(ZERO_SHOT, sources, queries)
    index_of = {pid: i for i, pid in enumerate(catalog.ids)}
    frames = []
    for row, (qid, query) in enumerate(zip(query_ids, queries)):
        top = top_positions(retriever[row], settings.top_k)
        bm25 = catalog.bm25.scores(query)
        lexical = [index_of[pid] for pid, _ in sources.lexical.search_one(query, settings.channel_k)]
        frames.append(pd.DataFrame({
            "query_id": qid, "query": query, "product_id": [catalog.ids[i] for i in top],
            "text": [catalog.texts[i] for i in top],
            "retriever_score": retriever[row][top], "retriever_rank": np.arange(1, len(top) + 1, dtype=float),
            "bm25_score": bm25[top], "bm25_rank": rank_lookup(top_positions(bm25, settings.channel_k, True), n)[top],
            "lexical_rank": rank_lookup(lexical, n)[top],
            "ann_rank": rank_lookup(top_positions(zero_shot[row], settings.channel_k), n)[top],
            "ann_score": zero_shot[row][top]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_features(sources: FeatureSources, query_ids: list[str], queries: list[str], settings: FeatureSettings,
                   segments: dict | None = None, llm_grades: pd.DataFrame | None = None,
                   engagement: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (query, candidate): query_id, query, product_id, text and the feature columns of every group.
    `segments`: query_id -> head/torso/tail; `llm_grades`: (query_id, product_id, tier2_expected, tier3_expected);
    `engagement`: product_id and numeric columns. Rows are in the retriever's order per query."""
    frame = candidates(sources, list(query_ids), list(queries), settings)
    if frame.empty:
        return frame
    probs = sources.tier1.probs(frame["query"].tolist(), frame["text"].tolist())
    grades = np.asarray(sources.tier1.grades, dtype=float)
    for j in range(probs.shape[1]):
        frame[f"ce_p{j + 1}"] = probs[:, j]
    frame["ce_expected"] = probs @ grades
    frame["title_coverage"] = [coverage(q, title_of(t)) for q, t in zip(frame["query"], frame["text"])]
    frame["text_coverage"] = [coverage(q, t) for q, t in zip(frame["query"], frame["text"])]
    frame["query_terms"] = frame["query"].map(lambda q: float(len(tokens(q))))
    frame["query_segment"] = frame["query_id"].map(lambda q: SEGMENT_CODES.get((segments or {}).get(q), np.nan)).astype(float)
    frame = _join_llm(frame, llm_grades)
    return _join_engagement(frame, engagement, settings.engagement_columns)


def _join_llm(frame: pd.DataFrame, llm_grades: pd.DataFrame | None) -> pd.DataFrame:
    columns = FIXED_COLUMNS["llm"]
    if llm_grades is None or llm_grades.empty:
        return frame.assign(**{c: np.nan for c in columns})
    grades = llm_grades[["query_id", "product_id", *columns]].drop_duplicates(["query_id", "product_id"])
    return frame.merge(grades, on=["query_id", "product_id"], how="left")


def _join_engagement(frame: pd.DataFrame, engagement: pd.DataFrame | None, names: list[str]) -> pd.DataFrame:
    if not names:
        return frame
    if engagement is None:
        return frame.assign(**{f"eng_{c}": np.nan for c in names})
    values = engagement[["product_id", *names]].rename(columns={c: f"eng_{c}" for c in names})
    values["product_id"] = values["product_id"].astype(str)
    return frame.merge(values.drop_duplicates("product_id"), on="product_id", how="left")
