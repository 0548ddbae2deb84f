"""Channel `lexical`: a dictionary matcher over title and attributes.

Every distinct (normalised, stemmed) query term is looked up in an inverted index of the
products' title and attribute terms. A product is retrieved when it contains at least one query
term; products are ranked by coverage (share of the query's terms they contain). Within the same
coverage, an exact phrase match (the query's terms contiguous in the title or attributes) comes
first, then the share of the query's terms found in the title, then titles with fewer other
words. The tie-breakers are scaled below one coverage step, so coverage always decides first.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from annomine.retrievers.analysis import analyze
from annomine.retrievers.registry import Channel, ChannelInputs
from annomine.vocabulary import LEXICAL


class LexicalRetriever:
    channel = LEXICAL

    def __init__(self, product_ids: list[str], titles: list[str | None], attributes: list[str | None] | None = None):
        if attributes is None:
            attributes = [None] * len(titles)
        if not (len(product_ids) == len(titles) == len(attributes)):
            raise ValueError("product_ids, titles and attributes must have the same length")
        self.product_ids = np.asarray(product_ids, dtype=object)
        title_terms = [analyze(t) for t in titles]
        attr_terms = [analyze(a) for a in attributes]
        # Phrase matching runs on the term sequences joined by spaces, padded so ' a b ' only matches whole terms.
        self._phrase_text = [f" {' '.join(t)} | {' '.join(a)} " for t, a in zip(title_terms, attr_terms)]
        self._title_len = np.array([max(len(set(t)), 1) for t in title_terms], dtype=np.float64)
        any_post: dict[str, list[int]] = defaultdict(list)
        title_post: dict[str, list[int]] = defaultdict(list)
        for i, (t, a) in enumerate(zip(title_terms, attr_terms)):
            for term in set(t) | set(a):
                any_post[term].append(i)
            for term in set(t):
                title_post[term].append(i)
        self._any = {k: np.asarray(v, dtype=np.int64) for k, v in any_post.items()}
        self._title = {k: np.asarray(v, dtype=np.int64) for k, v in title_post.items()}

    def __len__(self) -> int:
        return len(self.product_ids)

    def search_one(self, query: str, k: int) -> list[tuple[str, float]]:
        terms = analyze(query)
        uniq = list(dict.fromkeys(terms))
        if not uniq or k <= 0:
            return []
        n = len(self.product_ids)
        matched = np.zeros(n, dtype=np.float64)
        in_title = np.zeros(n, dtype=np.float64)
        for term in uniq:
            post = self._any.get(term)
            if post is not None:
                matched[post] += 1
            post = self._title.get(term)
            if post is not None:
                in_title[post] += 1
        cand = np.flatnonzero(matched)
        if cand.size == 0:
            return []
        n_terms = len(uniq)
        coverage = matched[cand] / n_terms
        title_share = in_title[cand] / n_terms
        focus = np.minimum(in_title[cand] / self._title_len[cand], 1.0)
        phrase = np.zeros(cand.size, dtype=np.float64)
        needle = f" {' '.join(terms)} "
        full = np.flatnonzero(matched[cand] == n_terms)
        for j in full:
            if needle in self._phrase_text[cand[j]]:
                phrase[j] = 1.0
        bonus = 0.5 * phrase + 0.3 * title_share + 0.2 * focus  # in [0, 1]
        score = coverage + bonus / (n_terms + 1) * 0.999
        order = np.lexsort((cand, -score))[:k]  # best score first, then catalog order
        return [(str(self.product_ids[cand[j]]), float(round(score[j], 6))) for j in order]

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        return [self.search_one(q, k) for q in queries]


def build(inputs: ChannelInputs, config) -> LexicalRetriever:
    """Titles, and brand ; category ; attributes as the attribute text."""
    products = inputs.products
    attrs = products[["brand", "category", "attributes"]].fillna("").agg(" ; ".join, axis=1).tolist()
    return LexicalRetriever(products["product_id"].tolist(), products["title"].tolist(), attrs)


CHANNEL = Channel(LEXICAL, build)
