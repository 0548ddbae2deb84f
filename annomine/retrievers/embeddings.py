"""The ANN channel's item embeddings, cached in `product_embeddings` by content hash.

`ensure_embeddings` returns embeddings aligned with the catalog, encoding only the products
without a current one (new, or changed since they were encoded) and MERGEing those. Rows are keyed by
`vector_key(encoder, max_length)`; a stage that needs the same model's vectors of the same product text
reads them through `current_vectors` instead of encoding the catalog again (evaluate's zero-shot MiniLM
baseline; `vectors_by_text` for tier 1's bi-encoder cosine feature, which is the same model).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from annomine.progress import progress


def vector_key(encoder: str, max_length: int) -> str:
    """The `model` of `product_embeddings` rows: the encoder's name (or path) and its token limit."""
    return f"{encoder}@{int(max_length)}"


def current_vectors(ctx, model_key: str):
    """(product_id, embedding) of the products whose `model_key` vector was encoded from their current text
    (the row's content hash is the product's); None when the table does not exist."""
    from pyspark.sql import functions as F

    if not ctx.tables.exists("product_embeddings") or not ctx.tables.exists("products"):
        return None
    vectors = ctx.tables.read("product_embeddings").where(F.col("model") == model_key).select("product_id", "content_hash", "embedding")
    products = ctx.tables.read("products").select("product_id", "content_hash")
    return vectors.join(products, ["product_id", "content_hash"], "inner").select("product_id", "embedding")


def vectors_by_text(ctx, model_key: str, product_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """{product text: its current `model_key` vector} (`current_vectors` keyed by the text the vector was encoded
    from), of every product or of `product_ids` only; empty without the tables."""
    vectors = current_vectors(ctx, model_key)
    if vectors is None:
        return {}
    if product_ids is not None:
        wanted = ctx.spark.createDataFrame(pd.DataFrame({"product_id": sorted(set(map(str, product_ids)))}), "product_id string")
        vectors = vectors.join(wanted, "product_id", "left_semi")
    rows = vectors.join(ctx.tables.read("products").select("product_id", "text"), "product_id").select("text", "embedding")
    pdf = rows.toPandas()
    return {t: np.asarray(e, dtype=np.float32) for t, e in zip(pdf["text"], pdf["embedding"]) if isinstance(t, str)}


def _cached(ctx, model_key: str) -> dict[str, tuple[str, np.ndarray]]:
    from pyspark.sql import functions as F

    if not ctx.tables.exists("product_embeddings"):
        return {}
    rows = (ctx.tables.read("product_embeddings").where(F.col("model") == model_key)
            .select("product_id", "content_hash", "embedding").toPandas())
    return {p: (h, e) for p, h, e in zip(rows["product_id"], rows["content_hash"], rows["embedding"])}


def ensure_embeddings(ctx, products: pd.DataFrame, cfg, stats: dict) -> np.ndarray:
    """Item embeddings aligned with `products`, encoding only products without a current one.

    cfg: encoder, max_length, encode_batch_size, embed_chunk and model_key (`ann.ANNConfig`).
    """
    from annomine.encoders import shared_encoder

    cached = _cached(ctx, cfg.model_key)
    hashes = products["content_hash"].fillna("").tolist()
    todo = [i for i, (pid, h) in enumerate(zip(products["product_id"], hashes)) if pid not in cached or cached[pid][0] != h]
    stats["products_encoded"] = len(todo)
    stats["products_cached"] = len(products) - len(todo)
    print(f"product embeddings ({cfg.model_key}): {len(products) - len(todo)} cached, {len(todo)} to encode")
    if todo:
        encoder = shared_encoder(cfg.encoder, cfg.max_length)
        encoder.batch_size = cfg.encode_batch_size
        texts = products["text"].fillna("").tolist()
        started = time.time()
        with progress(len(todo), desc="encode catalog", unit="item") as bar:
            for start in range(0, len(todo), cfg.embed_chunk):
                idx = todo[start:start + cfg.embed_chunk]
                # the whole chunk in one call: the encoder sorts it by length into batches of encode_batch_size
                emb = encoder.encode([texts[i] for i in idx])
                bar.update(len(idx))
                chunk = pd.DataFrame({
                    "product_id": [products["product_id"].iat[i] for i in idx],
                    "model": cfg.model_key,
                    "content_hash": [hashes[i] for i in idx],
                    "embedding": [row.tolist() for row in emb],
                })
                ctx.tables.merge("product_embeddings", ctx.spark.createDataFrame(chunk, ctx.tables.spec("product_embeddings").schema))
                for i, vec in zip(idx, emb):
                    cached[products["product_id"].iat[i]] = (hashes[i], vec)
        seconds = time.time() - started
        stats["encode_seconds"] = round(seconds, 1)
        stats["encode_items_per_s"] = round(len(todo) / max(seconds, 1e-9), 1)
        print(f"encoded {len(todo)} products in {seconds:.1f}s ({stats['encode_items_per_s']} items/s incl. writes)")
    return np.stack([np.asarray(cached[p][1], dtype=np.float32) for p in products["product_id"]])
