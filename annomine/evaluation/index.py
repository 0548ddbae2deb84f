"""FAISS indexes over L2-normalised embeddings (inner product = cosine) and their recall against flat.

`flat` is exact (IndexFlatIP) and the default. `hnsw` (IndexHNSWFlat) and `ivf` (IndexIVFFlat) are
approximate; when one is used, the evaluation also searches a flat index and reports the share of
the exact top-k the approximate index found (`recall_against_flat`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from annomine.bounds import bounded

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")


@dataclass
class IndexConfig:
    kind: str = "flat"
    hnsw_m: int = bounded(32, ge=1)
    hnsw_ef_construction: int = bounded(200, ge=1)
    hnsw_ef_search: int = bounded(128, ge=1)
    # 0: chosen from the catalog size (about 4 * sqrt(n), at least 39 training points per list).
    ivf_nlist: int = bounded(0, ge=0)
    ivf_nprobe: int = bounded(16, ge=1)
    seed: int = 13

    def validate(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {list(INDEX_KINDS)}, got {self.kind!r}")


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    return arr


def ivf_nlist(n: int, requested: int = 0) -> int:
    if requested:
        return max(1, min(requested, n))
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def build_index(vectors: np.ndarray, cfg: IndexConfig | None = None):
    """A FAISS index (inner product) holding `vectors` (row i has id i)."""
    import faiss

    cfg = cfg or IndexConfig()
    cfg.validate()
    x = _as_matrix(vectors)
    n, dim = x.shape
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        nlist = ivf_nlist(n, cfg.ivf_nlist)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.seed
        index.train(x)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    if n:
        index.add(x)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids) of the top k per query; ids are -1 where fewer than k exist."""
    q = _as_matrix(queries)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if not index.ntotal or not len(q):
        return np.zeros((len(q), 0), dtype=np.float32), np.zeros((len(q), 0), dtype=np.int64)
    return index.search(q, k)


def recall_against_flat(approx_ids: np.ndarray, flat_ids: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / |exact top-k|."""
    if len(flat_ids) == 0:
        return float("nan")
    recalls = []
    for a, f in zip(approx_ids, flat_ids):
        exact = {int(i) for i in f if i >= 0}
        if exact:
            recalls.append(len(exact & {int(i) for i in a if i >= 0}) / len(exact))
    return float(np.mean(recalls)) if recalls else float("nan")


def retrieve_dense(item_vectors: np.ndarray, query_vectors: np.ndarray, k: int, cfg: IndexConfig | None = None) -> tuple[np.ndarray, dict]:
    """Top-k row ids per query with the configured index, and facts about the index.

    For hnsw / ivf the exact flat search runs too and `recall_vs_flat@k` is reported.
    """
    cfg = cfg or IndexConfig()
    started = time.perf_counter()
    index = build_index(item_vectors, cfg)
    built = time.perf_counter()
    _, ids = search(index, query_vectors, k)
    searched = time.perf_counter()
    info = {"kind": cfg.kind, "n_items": int(index.ntotal), "dim": int(_as_matrix(item_vectors).shape[1]),
            "build_s": round(built - started, 3), "search_s": round(searched - built, 3)}
    if cfg.kind == "hnsw":
        info.update({"hnsw_m": cfg.hnsw_m, "hnsw_ef_search": cfg.hnsw_ef_search})
    if cfg.kind == "ivf":
        info.update({"ivf_nlist": int(index.nlist), "ivf_nprobe": int(index.nprobe)})
    if cfg.kind != "flat":
        flat = build_index(item_vectors, IndexConfig(kind="flat"))
        _, exact = search(flat, query_vectors, k)
        info[f"recall_vs_flat@{k}"] = recall_against_flat(ids, exact)
        log.info("%s index: recall against flat @%d = %.4f", cfg.kind, k, info[f"recall_vs_flat@{k}"])
    return ids, info
