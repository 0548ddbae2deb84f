"""mapInPandas functions that run a retriever over batches of queries inside Spark.

The driver builds a retriever once, pickles it (`ship`) and captures the bytes in the closure of
the function passed to `mapInPandas`, so the index travels with the task to every worker. Each
worker process unpickles it once and keeps it in a module-level cache keyed by its digest:
batches reuse the same index, it is never rebuilt per batch.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
from pyspark.sql import types as T

OUTPUT_SCHEMA = T.StructType([
    T.StructField("query_id", T.StringType()),
    T.StructField("query", T.StringType()),
    T.StructField("channel", T.StringType()),
    T.StructField("product_id", T.StringType()),
    T.StructField("rank", T.IntegerType()),
    T.StructField("score", T.DoubleType()),
])

_CACHE: "OrderedDict[str, object]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4
LOADS = {"count": 0}  # how many times this process unpickled an index (tests check it stays at one per index)


@dataclass(frozen=True)
class ShippedIndex:
    digest: str
    payload: bytes

    @property
    def size_mb(self) -> float:
        return len(self.payload) / 1e6


def ship(retriever) -> ShippedIndex:
    payload = pickle.dumps(retriever, protocol=pickle.HIGHEST_PROTOCOL)
    return ShippedIndex(hashlib.sha256(payload).hexdigest()[:16], payload)


def load_shipped(shipped: ShippedIndex):
    """The retriever behind `shipped`, unpickled at most once per process."""
    with _CACHE_LOCK:
        if shipped.digest in _CACHE:
            _CACHE.move_to_end(shipped.digest)
            return _CACHE[shipped.digest]
        retriever = pickle.loads(shipped.payload)
        LOADS["count"] += 1
        _CACHE[shipped.digest] = retriever
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return retriever


def results_frame(query_ids: list[str], queries: list[str], channel: str, results: list[list[tuple[str, float]]]) -> pd.DataFrame:
    """Long format, 1-based ranks in result order: one row per (query, retrieved product)."""
    qids, qs, pids, ranks, scores = [], [], [], [], []
    for qid, q, hits in zip(query_ids, queries, results):
        seen = set()
        rank = 0
        for pid, score in hits:
            if pid in seen:
                continue
            seen.add(pid)
            rank += 1
            qids.append(qid)
            qs.append(q)
            pids.append(pid)
            ranks.append(rank)
            scores.append(float(score))
    return pd.DataFrame({
        "query_id": pd.Series(qids, dtype=object), "query": pd.Series(qs, dtype=object),
        "channel": pd.Series([channel] * len(qids), dtype=object), "product_id": pd.Series(pids, dtype=object),
        "rank": pd.Series(ranks, dtype="int32"), "score": pd.Series(scores, dtype="float64"),
    })


def search_batches(shipped: ShippedIndex, channel: str, k: int):
    """A mapInPandas function: (query_id, query) batches -> OUTPUT_SCHEMA rows, top-k per query."""

    def fn(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        retriever = load_shipped(shipped)
        for pdf in batches:
            if pdf.empty:
                continue
            qids = pdf["query_id"].astype(str).tolist()
            queries = pdf["query"].fillna("").astype(str).tolist()
            yield results_frame(qids, queries, channel, retriever.search(queries, k))

    return fn
