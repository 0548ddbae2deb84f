"""Seeded generator of large synthetic retrieval logs (Parquet) for the mining benchmark.

Writes into OUT: `products.parquet` (product_id, text), `queries.parquet` (query_id, query,
segment) and `logs/part-*.parquet` in the retrieval_logs schema. Each query has a pool of
"relevant" products; each of the three channels returns its top-K from that pool (shuffled per
channel so they partly agree) mixed with catalog noise, so every mining class occurs. Product
texts are Zipf-distributed terms, and a query's terms are planted in its pool's texts, so the
token-similar band has material. Noise can repeat a product within a channel's list (duplicates).

    python benchmarks/gen_logs.py --rows 10000000 --products 1000000 --out /tmp/mine/gen10m

Rows = queries x 3 channels x top_k (queries is derived from --rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHANNELS = ("lexical", "bm25", "ann")


def _vocab(n: int) -> np.ndarray:
    return np.array([f"t{i}" for i in range(n)], dtype=object)


def generate(out: Path, rows: int, n_products: int, top_k: int = 100, vocab: int = 200_000, seed: int = 7,
             chunk_queries: int = 20_000) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_queries = max(1, rows // (len(CHANNELS) * top_k))
    words = _vocab(vocab)

    # queries: 2-3 terms drawn from the mid/rare part of the vocabulary
    q_len = rng.integers(2, 4, n_queries)
    q_terms = rng.integers(200, vocab, (n_queries, 3))
    queries = [" ".join(words[q_terms[i, :q_len[i]]]) for i in range(n_queries)]
    segment = np.array(["head", "torso", "tail"], dtype=object)[rng.integers(0, 3, n_queries)]
    q_ids = np.array([f"q{i:08d}" for i in range(n_queries)], dtype=object)
    pq.write_table(pa.table({"query_id": q_ids, "query": queries, "segment": segment}), out / "queries.parquet")

    # product texts: 6-12 Zipf terms; pools of each query get one of its terms planted
    pool_size = int(top_k * 1.6)
    pools = rng.integers(0, n_products, (n_queries, pool_size))
    p_len = rng.integers(6, 13, n_products)
    zipf = np.minimum(rng.zipf(1.3, (n_products, 12)) - 1, vocab - 1)
    planted = np.full(n_products, -1, dtype=np.int64)
    owner_q = rng.integers(0, n_queries, n_products)  # most products are planted for one random query
    flat_pools = pools[:, : pool_size // 2].reshape(-1)
    planted[flat_pools] = q_terms[np.repeat(np.arange(n_queries), pool_size // 2), rng.integers(0, 2, flat_pools.size)]
    extra = rng.random(n_products) < 0.3
    planted[extra & (planted < 0)] = q_terms[owner_q[extra & (planted < 0)], 0]
    texts = []
    for i in range(n_products):
        toks = list(words[zipf[i, :p_len[i]]])
        if planted[i] >= 0:
            toks.insert(1, words[planted[i]])
        texts.append(" ".join(toks))
    p_ids = np.array([f"p{i:08d}" for i in range(n_products)], dtype=object)
    pq.write_table(pa.table({"product_id": p_ids, "text": texts}), out / "products.parquet")

    # logs, one Parquet file per chunk of queries
    (out / "logs").mkdir(exist_ok=True)
    logged_at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    n_rows = 0
    for part, start in enumerate(range(0, n_queries, chunk_queries)):
        stop = min(n_queries, start + chunk_queries)
        nq = stop - start
        cols = {k: [] for k in ("run_id", "query_id", "query", "channel", "product_id", "rank", "score", "logged_at", "source")}
        for c, ch in enumerate(CHANNELS):
            # the pool's first 8 items head every channel (easy positives); below them each channel
            # ranks by its own noisy key, ann with a weaker preference for the pool order
            pos = np.arange(pool_size)
            keys = rng.random((nq, pool_size)) * 0.5 + pos / pool_size * (1.0 if ch != "ann" else 0.3) - (pos < 8)
            order = np.argsort(keys, axis=1)[:, :top_k]
            picked = np.take_along_axis(pools[start:stop], order, axis=1)
            noise = rng.random((nq, top_k)) < 0.15
            picked = np.where(noise, rng.integers(0, n_products, (nq, top_k)), picked)
            ranks = np.tile(np.arange(1, top_k + 1, dtype=np.int32), nq)
            cols["run_id"].append(np.full(nq * top_k, f"bench-{ch}", dtype=object))
            cols["query_id"].append(np.repeat(q_ids[start:stop], top_k))
            cols["query"].append(np.repeat(np.array(queries[start:stop], dtype=object), top_k))
            cols["channel"].append(np.full(nq * top_k, ch, dtype=object))
            cols["product_id"].append(p_ids[picked.reshape(-1)])
            cols["rank"].append(ranks)
            cols["score"].append((1.0 / ranks).astype(np.float64))
        table = {k: np.concatenate(v) for k, v in cols.items() if v}
        m = table["rank"].size
        table["logged_at"] = pa.array([logged_at] * m, pa.timestamp("us", tz="UTC"))
        table["source"] = np.full(m, "gen_logs", dtype=object)
        pq.write_table(pa.table(table), out / "logs" / f"part-{part:05d}.parquet")
        n_rows += m
    return {"rows": n_rows, "queries": n_queries, "products": n_products, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="log rows (1M, 10M, 50M ...)")
    ap.add_argument("--products", type=int, default=1_000_000, help="catalog size")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    started = time.time()
    info = generate(Path(args.out), args.rows, args.products, args.top_k, seed=args.seed)
    print(f"wrote {info['rows']:,} log rows for {info['queries']:,} queries over {info['products']:,} products "
          f"to {info['out']} in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
