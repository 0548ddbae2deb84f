"""Channel `bm25`: Okapi BM25 (the `bm25s` library) over title + description.

Reusable as the evaluation stage's BM25 baseline:

    BM25Retriever(product_ids, texts).search(queries, k) -> list[list[(product_id, score)]]

Only products with a positive score are returned (a query sharing no term with the catalog gets
an empty list).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from annomine.bounds import bounded
from annomine.retrievers.analysis import analyze
from annomine.retrievers.registry import Channel, ChannelInputs
from annomine.vocabulary import BM25

log = logging.getLogger(__name__)


class BM25Retriever:
    channel = BM25

    def __init__(self, product_ids: list[str], texts: list[str | None], k1: float = 1.5, b: float = 0.75):
        import bm25s

        if len(product_ids) != len(texts):
            raise ValueError("product_ids and texts must have the same length")
        if not product_ids:
            raise ValueError("BM25Retriever needs at least one product")
        self.product_ids = np.asarray(product_ids, dtype=object)
        corpus = [analyze(t) for t in texts]
        self.model = bm25s.BM25(k1=k1, b=b)
        self.model.index(corpus, show_progress=False)
        self.vocab = set(self.model.vocab_dict)

    def __len__(self) -> int:
        return len(self.product_ids)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every product (in `product_ids` order) for one query; zeros when no term is known."""
        toks = [t for t in analyze(query) if t in self.vocab]
        if not toks:
            return np.zeros(len(self.product_ids))
        return np.asarray(self.model.get_scores(toks), dtype=float)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        out: list[list[tuple[str, float]]] = [[] for _ in queries]
        token_lists, positions = [], []
        for i, q in enumerate(queries):
            toks = [t for t in analyze(q) if t in self.vocab]
            if toks:
                token_lists.append(toks)
                positions.append(i)
        if not token_lists or k <= 0:
            return out
        k_eff = min(k, len(self.product_ids))
        docs, scores = self.model.retrieve(token_lists, k=k_eff, show_progress=False, n_threads=0)
        for row, i in enumerate(positions):
            hits = []
            for d, s in zip(docs[row], scores[row]):
                if s <= 0:
                    break
                hits.append((str(self.product_ids[int(d)]), float(s)))
            out[i] = hits
        return out


@dataclass(frozen=True)
class BM25Config:
    k1: float = bounded(1.5, ge=0)
    b: float = bounded(0.75, ge=0, le=1)


def build(inputs: ChannelInputs, config: BM25Config) -> BM25Retriever:
    """Title + description (HTML stripped)."""
    from annomine.text import strip_html

    products = inputs.products
    texts = [f"{t or ''} {strip_html(d)}" for t, d in zip(products["title"], products["description"])]
    return BM25Retriever(products["product_id"].tolist(), texts, k1=config.k1, b=config.b)


CHANNEL = Channel(BM25, build, BM25Config, config_keys={"k1": "bm25_k1", "b": "bm25_b"},
                  run_key=lambda c: {"bm25": [c.k1, c.b]})
