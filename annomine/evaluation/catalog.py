"""Dense models and the catalog they search: a model spec's identity (`ModelSpec`), its encoder loaded once per
process, and the catalog's item embeddings.

Dense models encode the catalog with the item tower (queries with the query tower), batched on the
driver for small catalogs, or in Spark (`mapInPandas`, encoder loaded once per worker process) for a
catalog above `EncodeSettings.spark_threshold`, and for a products table on a cluster. On the embedded engine
(Sail in this process) a products table below the threshold is encoded on the driver: its UDFs would run in this
process anyway, behind an Arrow round trip (9,913 CrowdFlower products: 93-100 s against 107-108 s). Catalog embeddings are cached
under `<warehouse>/cache/eval_embeddings/<model key>/<content key>.npz`, keyed by the model's
weights and the catalog's (id, text) pairs. In table mode the zero-shot `minilm` baseline takes the ANN
channel's vectors of the products table (`product_embeddings`, the same model, text and length) when
every product has a current one, instead of encoding the catalog a second time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.bounds import bounded
from annomine.errors import AnnomineError
from annomine.evaluation.index import IndexConfig
from annomine.spark import is_embedded

log = logging.getLogger(__name__)

BASELINES = ("bm25", "minilm")
TWO_TOWER_META = "twotower.json"


class ModelSpecError(AnnomineError, ValueError):
    """A model spec names nothing that can be loaded."""


@dataclass
class ModelSpec:
    label: str
    kind: str  # bm25 | minilm | folder
    source: str
    path: str | None = None
    model_uri: str | None = None
    # What a trained variant learned from (its pointer's `training_pairs`: examples per source in kept stages).
    training_pairs: dict | None = None
    # "rrf:bm25": the dense model's ranking fused with BM25's (a hybrid, not a model of its own).
    fusion: str | None = None
    # A judge folder: the list is reordered by that judge's tier-1 expected grade (`+ce`).
    rerank: str | None = None

    @property
    def baseline(self) -> bool:
        return self.kind in BASELINES and not self.rerank

    @property
    def two_tower(self) -> bool:
        return self.kind == "folder" and self.path is not None and (Path(self.path) / TWO_TOWER_META).is_file()

    def as_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "source": self.source, "path": self.path,
                "model_uri": self.model_uri, "baseline": self.baseline, "two_tower": self.two_tower,
                "training_pairs": self.training_pairs, "fusion": self.fusion, "rerank": self.rerank}


@dataclass
class EncodeSettings:
    query_max_len: int = bounded(16, ge=1)
    item_max_len: int = bounded(64, ge=1)
    batch_size: int = bounded(128, ge=1)
    # Catalogs larger than this are encoded in Spark (a products table always is on a cluster; on the embedded engine
    # its UDFs run in this process, so there only above this size).
    spark_threshold: int = bounded(50000, ge=0)
    spark_partitions: int = bounded(4, ge=1)
    cache: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)

# ---- dense encoders ----------------------------------------------------------------------
class HFEncoder:
    """A plain BERT folder (or 'minilm') as one shared tower with separate query/item lengths.

    Encodes through `annomine.encoders.TextEncoder` (ONNX Runtime on CPU when it imports, else torch).
    """

    def __init__(self, name_or_path: str, query_max_len: int = 16, item_max_len: int = 64, batch_size: int = 128):
        from annomine.encoders import TextEncoder

        self.encoder = TextEncoder(name_or_path, max_length=item_max_len, batch_size=batch_size)
        self.query_max_len, self.item_max_len = query_max_len, item_max_len

    def _encode(self, texts, max_len: int, batch_size: int, progress: bool, desc: str) -> np.ndarray:
        self.encoder.max_length, self.encoder.batch_size = max_len, batch_size
        return self.encoder.encode([t if isinstance(t, str) else "" for t in texts], progress=progress, desc=desc)

    def encode_queries(self, texts, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        return self._encode(texts, self.query_max_len, batch_size, progress, "encode queries")

    def encode_items(self, texts, batch_size: int = 128, progress: bool = False) -> np.ndarray:
        return self._encode(texts, self.item_max_len, batch_size, progress, "encode items")


def load_encoder(kind: str, path: str | None, settings: EncodeSettings):
    """An object with encode_queries / encode_items for a dense spec."""
    if kind == "minilm":
        return HFEncoder("minilm", settings.query_max_len, settings.item_max_len, settings.batch_size)
    if kind != "folder" or not path:
        raise ModelSpecError(f"not a dense model: {kind}")
    folder = Path(path)
    if (folder / TWO_TOWER_META).is_file():
        import torch

        from annomine.two_tower import TwoTower

        # 'auto': ONNX Runtime on CPU (one export per tower, cached by weights), torch on CUDA
        return TwoTower.load(folder, device="cuda" if torch.cuda.is_available() else None, backend="auto")
    if (folder / "config.json").is_file():
        return HFEncoder(str(folder), settings.query_max_len, settings.item_max_len, settings.batch_size)
    raise ModelSpecError(f"{folder}: neither a two-tower ({TWO_TOWER_META}) nor a Hugging Face model folder")


_WORKER_ENCODERS: dict[tuple, object] = {}
_WORKER_LOCK = threading.Lock()


def worker_encoder(kind: str, path: str | None, settings: EncodeSettings):
    """The encoder of this process, loaded once (Spark workers call this per partition)."""
    key = (kind, path, settings.query_max_len, settings.item_max_len, settings.batch_size)
    with _WORKER_LOCK:  # partitions may run in threads of one process: load once
        if key not in _WORKER_ENCODERS:
            _WORKER_ENCODERS.clear()  # one model per process at a time
            _WORKER_ENCODERS[key] = load_encoder(kind, path, settings)
        return _WORKER_ENCODERS[key]


def model_key(spec: ModelSpec, settings: EncodeSettings) -> str:
    """A key of the weights and text lengths: the same model gives the same key wherever it lies."""
    h = hashlib.sha256()
    if spec.kind == "minilm":
        from annomine.encoders import minilm_path

        h.update(f"minilm|{minilm_path().name}|{settings.query_max_len}|{settings.item_max_len}".encode())
        return "minilm-" + h.hexdigest()[:16]
    folder = Path(spec.path)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not (folder / TWO_TOWER_META).is_file():  # plain HF folders take the lengths from settings
        h.update(f"|{settings.query_max_len}|{settings.item_max_len}".encode())
    return re.sub(r"[^A-Za-z0-9_-]", "_", folder.name)[:40] + "-" + h.hexdigest()[:16]

# ---- catalog -------------------------------------------------------------------------------
def row_hash(product_id: str, text: str | None) -> str:
    """sha256 of `product_id<TAB>text`, the same as Spark's sha2(concat_ws('\\t', product_id, text), 256)."""
    return hashlib.sha256(f"{product_id}\t{text or ''}".encode("utf-8")).hexdigest()


class Catalog:
    """Product ids and texts in a fixed order; `frame` is the Spark source in table mode.

    `content_key` identifies the set of (id, text) pairs regardless of order or source, so a file
    and the table ingested from it share cached embeddings.
    """

    def __init__(self, ids: list[str], texts: list[str] | None = None, row_hashes: list[str] | None = None, frame=None):
        self.ids = [str(i) for i in ids]
        self._texts = texts
        self.frame = frame
        if row_hashes is None:
            if texts is None:
                raise ValueError("a catalog needs texts or row hashes")
            row_hashes = [row_hash(pid, text) for pid, text in zip(self.ids, texts)]
        h = hashlib.sha256()
        for pid, rh in sorted(zip(self.ids, row_hashes)):
            h.update(f"{pid}\t{rh}\n".encode())
        self.content_key = h.hexdigest()[:20]
        self._bm25 = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            pdf = self.frame.select("product_id", "text").toPandas()
            lookup = dict(zip(pdf["product_id"].astype(str), pdf["text"].fillna("").astype(str)))
            self._texts = [lookup.get(i, "") for i in self.ids]
        return self._texts

    @property
    def bm25(self):
        """The BM25 index over these texts, built on first use: `bm25` and every `+bm25` hybrid of one evaluation
        search the same index."""
        if self._bm25 is None:
            from annomine.retrievers.bm25 import BM25Retriever

            self._bm25 = BM25Retriever(self.ids, self.texts)
        return self._bm25


def _encode_in_spark(spark, catalog: Catalog, kind: str, path: str | None, settings: EncodeSettings) -> np.ndarray:
    from pyspark.sql import types as T

    frame = catalog.frame
    if frame is None:
        frame = spark.createDataFrame(pd.DataFrame({"product_id": catalog.ids, "text": catalog.texts}))
    batch_size = settings.batch_size

    def encode(batches):
        encoder = worker_encoder(kind, path, settings)
        for pdf in batches:
            emb = encoder.encode_items(pdf["text"].fillna("").astype(str).tolist(), batch_size=batch_size)
            yield pd.DataFrame({"product_id": pdf["product_id"].astype(str), "embedding": list(emb)})

    schema = T.StructType([T.StructField("product_id", T.StringType()), T.StructField("embedding", T.ArrayType(T.FloatType()))])
    out = (frame.select("product_id", "text").repartition(max(1, settings.spark_partitions))
           .mapInPandas(encode, schema).toPandas())
    position = {pid: i for i, pid in enumerate(catalog.ids)}
    matrix, filled = None, set()
    for pid, vec in zip(out["product_id"], out["embedding"]):
        if matrix is None:
            matrix = np.zeros((len(catalog), len(vec)), dtype=np.float32)
        if pid in position:
            matrix[position[pid]] = np.asarray(vec, dtype=np.float32)
            filled.add(pid)
    if matrix is None or len(filled) < len(catalog):
        missing = [pid for pid in catalog.ids if pid not in filled][:5]
        raise RuntimeError(f"Spark encoding returned embeddings for {len(filled)} of {len(catalog)} products (missing e.g. {missing})")
    return matrix


def catalog_embeddings(spec: ModelSpec, catalog: Catalog, settings: EncodeSettings, cache_dir: Path | None,
                       spark=None, stored=None) -> tuple[np.ndarray, dict]:
    """Item-tower embeddings of the catalog (row i = catalog.ids[i]) and how they were obtained.

    `stored(spec, catalog, settings)`: vectors already computed elsewhere for this model, text and length (the ANN
    channel's `product_embeddings` in table mode), aligned with the catalog, or None; tried after the cache."""
    key = model_key(spec, settings)
    file = cache_dir / key / f"{catalog.content_key}.npz" if cache_dir is not None else None
    if settings.cache and file is not None and file.is_file():
        with np.load(file, allow_pickle=False) as cached:
            position = {pid: i for i, pid in enumerate(cached["ids"].tolist())}
            if all(pid in position for pid in catalog.ids):
                emb = cached["embeddings"][[position[pid] for pid in catalog.ids]]
                log.info("%s: catalog embeddings from cache %s", spec.label, file)
                return emb, {"model_key": key, "how": "cache", "encode_s": 0.0}
    if settings.cache and stored is not None:
        emb = stored(spec, catalog, settings)
        if emb is not None:
            log.info("%s: catalog embeddings from product_embeddings (the ANN channel's vectors)", spec.label)
            return np.ascontiguousarray(emb, dtype=np.float32), {"model_key": key, "how": "product_embeddings", "encode_s": 0.0}
    started = time.perf_counter()
    use_spark = spark is not None and (len(catalog) > settings.spark_threshold or (catalog.frame is not None and not is_embedded()))
    if use_spark:
        log.info("%s: encoding %d products in Spark", spec.label, len(catalog))
        emb = _encode_in_spark(spark, catalog, spec.kind, spec.path, settings)
        how = "spark"
    else:
        encoder = worker_encoder(spec.kind, spec.path, settings)
        emb = encoder.encode_items(catalog.texts, batch_size=settings.batch_size, progress=True)
        how = "driver"
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if settings.cache and file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.stem + ".tmp.npz")
        np.savez(tmp, ids=np.asarray(catalog.ids, dtype=str), embeddings=emb)
        os.replace(tmp, file)
    return emb, {"model_key": key, "how": how, "encode_s": round(time.perf_counter() - started, 2)}
