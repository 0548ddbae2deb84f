"""FAISS flat vs HNSW: build time, queries/s and recall@10 of HNSW against exact search."""

from __future__ import annotations

import argparse

import faiss
import numpy as np

from common import Timer, emit


def vectors(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(items, queries): unit vectors around 256 centres (clustered vectors look more like text embeddings than
    uniform noise does); each query is an item plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype("float32")
    items = centres[rng.integers(0, 256, n)] + 0.5 * rng.normal(size=(n, dim)).astype("float32")
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[rng.integers(0, n, n_queries)] + 0.3 * rng.normal(size=(n_queries, dim)).astype("float32")
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return items, queries


def build_hnsw(items: np.ndarray, m: int = 32, ef_construction: int = 80):
    index = faiss.IndexHNSWFlat(items.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(items)
    return index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    items, queries = vectors(args.n, args.dim, args.queries)

    with Timer() as t_build_flat:
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(items)
    with Timer() as t_query_flat:
        _, exact = flat.search(queries, args.k)
    emit(f"FAISS flat build, {args.n:,} x {args.dim}", round(t_build_flat.seconds, 3), "s")
    emit(f"FAISS flat query throughput, {args.n:,} x {args.dim}, k={args.k}", round(args.queries / t_query_flat.seconds), "queries/s")

    with Timer() as t_build_hnsw:
        hnsw = build_hnsw(items)
    emit(f"FAISS HNSW (M=32, efC=80) build, {args.n:,} x {args.dim}", round(t_build_hnsw.seconds, 2), "s")
    for ef in (32, 128):
        hnsw.hnsw.efSearch = ef
        with Timer() as t_q:
            _, approx = hnsw.search(queries, args.k)
        recall = np.mean([len(set(a) & set(e)) / args.k for a, e in zip(approx, exact)])
        emit(f"FAISS HNSW efSearch={ef} query throughput", round(args.queries / t_q.seconds), "queries/s")
        emit(f"FAISS HNSW efSearch={ef} recall@{args.k} vs flat", round(float(recall), 4), "recall")


if __name__ == "__main__":
    main()
