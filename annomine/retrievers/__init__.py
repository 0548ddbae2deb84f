"""The retrieval channels whose disagreement annomine mines, and their registry.

Each retriever is pure Python: it builds its index once from the catalog and answers batches of
queries with `search(queries, k) -> list[list[(product_id, score)]]` (best first, score higher =
better, at most k per query, no product twice). They pickle, so a job builds the index once on the
driver and ships it to Spark workers (`spark_udfs.retrieval`).

- `lexical.LexicalRetriever`: dictionary matcher, exact term/phrase match against title + attributes.
- `bm25.BM25Retriever`: BM25 (bm25s) over title + description.
- `ann.ANNRetriever`: MiniLM embeddings searched with FAISS.

Each of these modules also defines `CHANNEL`, its entry in the channel registry
(`registry`: name -> factory + config); the built-in channel names, in canonical order, are
`annomine.vocabulary.CHANNELS`.
"""

from __future__ import annotations

from annomine.vocabulary import CHANNELS

__all__ = ["CHANNELS"]
