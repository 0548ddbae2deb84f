"""Reranking latency of the rank stage's ranker for one query at a time on CPU: the retriever's top K (100), every
feature (channels, BM25, tier 1 on the K pairs, coverage) and LightGBM, with tier 1's score cache off.

    python benchmarks/bench_rank.py --warehouse warehouse/crowdflower --products data/products.tsv \
        --queries data/queries.tsv --n 20

Needs a warehouse where `annomine rank` ran (its `rankers/current.json`). The catalog is encoded once (cached, as
in evaluate) before the clock starts; each query is then ranked alone, as a search request would be.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402


def main() -> None:
    from annomine.evaluation.inputs import catalog_from_file, queries_from_file
    from annomine.evaluation.catalog import EncodeSettings
    from annomine.ranking.apply import RankedLists
    from annomine.ranking.store import load_published

    parser = argparse.ArgumentParser()
    parser.add_argument("--warehouse", required=True)
    parser.add_argument("--products", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--n", type=int, default=20, help="queries ranked one at a time")
    parser.add_argument("--cache", default="/tmp/annomine-bench-rank", help="catalog embeddings cache (not the warehouse's)")
    args = parser.parse_args()
    warehouse = Path(args.warehouse).resolve()
    published = load_published(warehouse, warehouse)
    catalog, _ = catalog_from_file(args.products)
    texts = queries_from_file(args.queries)["query"].tolist()[: args.n + 1]
    lists = RankedLists(published, "ranked", catalog, EncodeSettings(), Path(args.cache), None)
    lists.rank(texts[:1])  # warm-up: models loaded, catalog embeddings read, BM25 and lexical indexes built
    text_of = dict(zip(catalog.ids, catalog.texts))
    total, tier1, ranker = [], [], []
    for text in texts[1:]:
        lists.tier1._known = {}  # nothing cached: every pair is scored, as for a new query
        started = time.perf_counter()
        ranked, info = lists.rank([text])
        total.append(time.perf_counter() - started)
        lists.tier1._known = {}
        t0 = time.perf_counter()  # tier 1 alone on the same K pairs
        lists.tier1.probs([text] * len(ranked[0]), [text_of[i] for i in ranked[0]])
        tier1.append(time.perf_counter() - t0)
        ranker.append(info["rerank_s"])
    k = published.meta["features"]["top_k"]
    emit(f"rerank one query, K={k}: retrieval + features + tier 1 + LightGBM (median)", float(np.median(total)), "s",
         p90=float(np.percentile(total, 90)), queries=len(total))
    emit(f"tier 1 alone on K={k} pairs (median)", float(np.median(tier1)), "s")
    emit(f"LightGBM scoring + sort of K={k} candidates (median)", float(np.median(ranker)), "s")


if __name__ == "__main__":
    main()
