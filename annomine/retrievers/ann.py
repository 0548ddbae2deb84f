"""Channel `ann`: dense retrieval with a MiniLM bi-encoder and a FAISS inner-product index.

Item embeddings are computed once (the job caches them in `product_embeddings`) and handed in;
queries are encoded on the fly with the same encoder (loaded once per process and cached). The
index is `flat` (exact inner product, fine up to ~100k items), `hnsw` (graph ANN for big
catalogs) or `auto` (hnsw above 100k items). It pickles as FAISS's own serialisation, so a
job builds it once and ships it to the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from annomine.bounds import bounded
from annomine.encoders import shared_encoder
from annomine.retrievers.registry import Channel, ChannelInputs
from annomine.vocabulary import ANN

HNSW_ABOVE = 100_000


def _build_index(embeddings: np.ndarray, kind: str):
    import faiss

    dim = embeddings.shape[1]
    if kind == "auto":
        kind = "hnsw" if len(embeddings) > HNSW_ABOVE else "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        raise ValueError(f"unknown FAISS index kind {kind!r}; use flat, hnsw or auto")
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index, kind


class ANNRetriever:
    channel = ANN

    def __init__(self, product_ids: list[str], embeddings: np.ndarray, encoder: str = "minilm", max_length: int = 64,
                 index: str = "flat"):
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(product_ids):
            raise ValueError(f"embeddings must be (n_products, dim); got {embeddings.shape} for {len(product_ids)} products")
        if not product_ids:
            raise ValueError("ANNRetriever needs at least one product")
        self.product_ids = np.asarray(product_ids, dtype=object)
        self.encoder_name = encoder
        self.max_length = max_length
        self.index, self.index_kind = _build_index(embeddings, index)

    @classmethod
    def from_texts(cls, product_ids: list[str], texts: list[str], encoder: str = "minilm", max_length: int = 64,
                   index: str = "flat") -> "ANNRetriever":
        emb = shared_encoder(encoder, max_length).encode(list(texts))
        return cls(product_ids, emb, encoder=encoder, max_length=max_length, index=index)

    def __len__(self) -> int:
        return len(self.product_ids)

    # FAISS indexes do not pickle; ship their own byte serialisation instead.
    def __getstate__(self):
        import faiss

        state = dict(self.__dict__)
        state["index"] = faiss.serialize_index(self.index)
        return state

    def __setstate__(self, state):
        import faiss

        state = dict(state)
        state["index"] = faiss.deserialize_index(state["index"])
        self.__dict__.update(state)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return shared_encoder(self.encoder_name, self.max_length).encode([q or "" for q in queries])

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        k_eff = min(k, len(self.product_ids))
        if k_eff <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        if self.index_kind == "hnsw":
            self.index.hnsw.efSearch = max(64, 2 * k_eff)
        scores, idx = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k_eff)
        out = []
        for srow, irow in zip(scores, idx):
            out.append([(str(self.product_ids[i]), float(s)) for s, i in zip(srow, irow) if i >= 0])
        return out

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        if not queries:
            return []
        return self.search_vectors(self.encode_queries(list(queries)), k)


@dataclass(frozen=True)
class ANNConfig:
    encoder: str = "minilm"
    max_length: int = bounded(64, ge=8)
    encode_batch_size: int = bounded(128, ge=1)
    embed_chunk: int = bounded(4096, ge=1)
    ann_index: str = "flat"

    def validate(self) -> None:
        if self.ann_index not in ("flat", "hnsw", "auto"):
            raise ValueError(f"ann_index must be flat, hnsw or auto, got {self.ann_index!r}")

    @property
    def model_key(self) -> str:
        from annomine.retrievers.embeddings import vector_key

        return vector_key(self.encoder, self.max_length)


def build(inputs: ChannelInputs, config: ANNConfig) -> ANNRetriever:
    """The catalog's `text` embeddings (cached in `product_embeddings`) in a FAISS index."""
    from annomine.retrievers.embeddings import ensure_embeddings

    products = inputs.products
    embeddings = ensure_embeddings(inputs.ctx, products, config, inputs.stats)
    return ANNRetriever(products["product_id"].tolist(), embeddings, encoder=config.encoder,
                        max_length=config.max_length, index=config.ann_index)


CHANNEL = Channel(
    ANN, build, ANNConfig,
    config_keys={f: f for f in ("encoder", "max_length", "encode_batch_size", "embed_chunk", "ann_index")},
    run_key=lambda c: {"model": c.model_key, "ann_index": c.ann_index})
