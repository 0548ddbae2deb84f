"""Model specs -> top-k product ids per query over the whole catalog.

A spec is one of:
- `bm25`: the BM25 channel's retriever (`annomine.retrievers.bm25.BM25Retriever`), a baseline;
- `minilm`: zero-shot all-MiniLM-L6-v2 (bundled weights), a baseline;
- a local folder: a two-tower (`annomine.two_tower.TwoTower`, has `twotower.json`) or a plain Hugging
  Face BERT folder (one shared tower, mean pooling);
- `best` or a training variant name: `<warehouse>/models/<name>.json` = {"path": ..., "model_uri": ...};
  `variants` expands to every variant file there except best.json;
- an MLflow model URI (`runs:/...`, `models:/...`): the artifacts are downloaded and loaded as a folder.
Any spec may be prefixed with a label: `mine=/path/to/model`.
Any dense spec may be suffixed with `+bm25` (`minilm+bm25`, `curriculum+bm25`, `variants+bm25`): a hybrid that fuses
the dense model's and BM25's top-k by reciprocal rank fusion (Cormack et al. 2009, rank constant 60; nothing is
tuned). `minilm+bm25` is a baseline: the hybrid a user could run without training anything.
Any dense or hybrid spec may be suffixed with `+ce` (`best+ce`): its top-k reordered by the current judge's tier-1
expected grade, the cross-encoder rerank a sentence-transformers user would run.
- `ranked`: the rank stage's ranker (`<outputs>/rankers/current.json`, annomine/ranking/) over its retriever's top-K;
  `ranked-raw` and `ranked-no-ce` are its ablations (the judge's raw grade as the label; no cross-encoder features).

Dense models encode the catalog with the item tower (queries with the query tower), batched on the
driver for small catalogs, or in Spark (`mapInPandas`, encoder loaded once per worker process) for a
products table or a catalog above `EncodeSettings.spark_threshold`. Catalog embeddings are cached
under `<warehouse>/cache/eval_embeddings/<model key>/<content key>.npz`, keyed by the model's
weights and the catalog's (id, text) pairs. In table mode the zero-shot `minilm` baseline takes the ANN
channel's vectors of the products table (`product_embeddings`, the same model, text and length) when
every product has a current one, instead of encoding the catalog a second time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.bounds import bounded
from annomine.errors import AnnomineError
from annomine.evaluation.index import IndexConfig, retrieve_dense
from annomine.evaluation.metrics import HYBRID_SUFFIX

log = logging.getLogger(__name__)

BASELINES = ("bm25", "minilm")
CE_SUFFIX = "+ce"
RANKED_SPECS = ("ranked", "ranked-raw", "ranked-no-ce")  # = annomine.ranking.store.VARIANT_FILES
RRF_RANK_CONSTANT = 60
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "dbfs:/")
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
    # Catalogs larger than this are encoded in Spark (a products table always is).
    spark_threshold: int = bounded(50000, ge=0)
    spark_partitions: int = bounded(4, ge=1)
    cache: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)


# ---- spec resolution ---------------------------------------------------------------------
def models_dir(warehouse: str | os.PathLike) -> Path:
    return Path(warehouse).expanduser().resolve() / "models"


def _model_folder(root: Path) -> Path:
    """The folder holding a loadable model inside `root` (two-tower first, then a HF BERT folder)."""
    if (root / TWO_TOWER_META).is_file() or (root / "config.json").is_file():
        return root
    for marker in (TWO_TOWER_META, "config.json"):
        found = sorted(root.rglob(marker), key=lambda p: len(p.parts))
        if found:
            return found[0].parent
    raise ModelSpecError(f"{root}: no model inside (expected {TWO_TOWER_META} or a Hugging Face config.json)")


def download_mlflow_model(uri: str, dest_root: Path, tracking_uri: str | None = None) -> Path:
    """Download the artifacts of an MLflow model URI and return the model folder inside."""
    import mlflow

    if tracking_uri:
        from annomine.evaluation.report import _use_tracking

        _use_tracking(tracking_uri)
    dest = dest_root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if dest.exists():  # `models:/name/latest` and aliases move: always fetch afresh
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    except Exception as exc:  # noqa: BLE001 - report the URI the user gave
        raise ModelSpecError(f"cannot download MLflow model {uri!r}: {exc}") from exc
    return _model_folder(Path(local))


def _from_registry_file(name: str, file: Path, download_root: Path, tracking_uri: str | None) -> ModelSpec:
    from annomine.publish import read_pointer

    entry = read_pointer(file, rerun="run `annomine train` again")  # "path" resolved against the pointer's folder
    path, uri, pairs = entry.get("path"), entry.get("model_uri"), entry.get("training_pairs")
    if path and Path(path).exists():
        return ModelSpec(name, "folder", str(file), path=str(_model_folder(Path(path))), model_uri=uri, training_pairs=pairs)
    if uri:
        return ModelSpec(name, "folder", str(file), path=str(download_mlflow_model(uri, download_root, tracking_uri)), model_uri=uri,
                         training_pairs=pairs)
    raise ModelSpecError(f"{file}: neither 'path' ({path!r}) exists nor a 'model_uri' is given")


def resolve_specs(spec: str, warehouse: str | os.PathLike, tracking_uri: str | None = None,
                  registry: Path | None = None) -> list[ModelSpec]:
    """One spec string -> model specs (`variants` gives several). `registry`: the folder of the variants'
    pointer files (default <warehouse>/models; a fold's own under <warehouse>/folds/)."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec")
    label = None
    match = re.match(r"^([A-Za-z0-9_.\-]+)=(.+)$", spec)
    if match and "://" not in match.group(1):
        label, spec = match.group(1), match.group(2)
    if spec.endswith(CE_SUFFIX) and spec != CE_SUFFIX and not Path(spec).expanduser().is_dir():
        return _cross_encoder_reranked(spec, label, warehouse, tracking_uri, registry)
    if spec in RANKED_SPECS:
        return [_ranked(spec, label, warehouse, registry)]
    if spec.endswith(HYBRID_SUFFIX) and spec != HYBRID_SUFFIX and not Path(spec).expanduser().is_dir():
        dense = resolve_specs(spec[:-len(HYBRID_SUFFIX)], warehouse, tracking_uri, registry)
        if any(d.kind == "bm25" for d in dense):
            raise ModelSpecError(f"{spec!r}: only a dense model can be fused with bm25")
        return [dataclasses.replace(d, label=label or d.label + HYBRID_SUFFIX, fusion="rrf:bm25") for d in dense]
    registry = registry or models_dir(warehouse)
    download_root = Path(warehouse).expanduser().resolve() / "cache" / "mlflow_models"
    if spec in BASELINES:
        return [ModelSpec(label or spec, spec, spec)]
    if spec.startswith(MLFLOW_SCHEMES):
        folder = download_mlflow_model(spec, download_root, tracking_uri)
        return [ModelSpec(label or spec, "folder", spec, path=str(folder), model_uri=spec)]
    if spec == "variants":
        files = sorted(f for f in registry.glob("*.json") if f.name != "best.json")
        if not files:
            raise ModelSpecError(f"'variants': no trained variants in {registry} (run the train stage)")
        return [_from_registry_file(f.stem, f, download_root, tracking_uri) for f in files]
    path = Path(spec).expanduser()
    if path.is_dir():
        return [ModelSpec(label or spec, "folder", spec, path=str(_model_folder(path.resolve())))]
    if re.fullmatch(r"[A-Za-z0-9_.\-]+", spec) and (registry / f"{spec}.json").is_file():
        return [_from_registry_file(label or spec, registry / f"{spec}.json", download_root, tracking_uri)]
    known = sorted(f.stem for f in registry.glob("*.json")) if registry.is_dir() else []
    raise ModelSpecError(
        f"unknown model {spec!r}: expected bm25, minilm, a model folder, runs:/ or models:/ URI, 'variants', "
        f"or a name in {registry} (known: {known or 'none yet'})")


def _cross_encoder_reranked(spec: str, label: str | None, warehouse, tracking_uri, registry) -> list[ModelSpec]:
    from annomine.judges.store import resolve_judge

    listed = resolve_specs(spec[:-len(CE_SUFFIX)], warehouse, tracking_uri, registry)
    if any(s.kind == "ranked" or s.rerank for s in listed):
        raise ModelSpecError(f"{spec!r}: only a retriever's list can be reranked by the cross-encoder")
    try:
        judge = resolve_judge(warehouse, None)
    except FileNotFoundError as exc:
        raise ModelSpecError(f"{spec!r}: {exc}") from exc
    return [dataclasses.replace(s, label=label or s.label + CE_SUFFIX, rerank=str(judge)) for s in listed]


def _ranked(spec: str, label: str | None, warehouse, registry: Path | None) -> ModelSpec:
    from annomine.errors import MissingInputError
    from annomine.ranking.store import load_published

    outputs = registry.parent if registry is not None else Path(warehouse).expanduser().resolve()
    try:
        published = load_published(outputs, Path(warehouse).expanduser().resolve())
        published.model(spec)
    except MissingInputError as exc:
        raise ModelSpecError(str(exc)) from exc
    return ModelSpec(label or spec, "ranked", spec, path=str(published.folder))


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
    use_spark = spark is not None and (catalog.frame is not None or len(catalog) > settings.spark_threshold)
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


# ---- retrieval ----------------------------------------------------------------------------
def reciprocal_rank_fusion(rankings: list[list[str]], k: int, rank_constant: int = RRF_RANK_CONSTANT) -> list[str]:
    """The top-k ids by the sum of 1 / (rank_constant + rank) over the rankings (rank from 1; an id a ranking lacks
    adds nothing). Ties keep the order of first appearance, the first ranking first."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, start=1):
            scores[pid] = scores.get(pid, 0.0) + 1.0 / (rank_constant + rank)
    return sorted(scores, key=lambda pid: -scores[pid])[:k]


def _reranked(spec: ModelSpec, catalog: Catalog, queries: list[str], k: int, settings: EncodeSettings,
              cache_dir: Path | None, spark, stored, segments) -> tuple[list[list[str]], dict]:
    from annomine.ranking import apply
    from annomine.ranking.tier1 import cache_folder

    tier1_cache = cache_folder(cache_dir.parent) if cache_dir is not None else None
    if spec.kind == "ranked":
        from annomine.ranking.store import from_folder

        published = from_folder(Path(spec.path))
        lists, info = apply.rank_with(published, spec.source, catalog, list(queries), settings, cache_dir, tier1_cache,
                                      segments, spark, stored)
        return [ids[:k] for ids in lists], info
    lists, info = retrieve(dataclasses.replace(spec, rerank=None), catalog, queries, k, settings, cache_dir, spark, stored)
    reranked, ce_info = apply.ce_rerank(lists, catalog, list(queries), Path(spec.rerank), tier1_cache)
    return reranked, {**info, **ce_info, "retriever": f"{info.get('retriever')}, reranked by tier 1 ({CE_SUFFIX})"}


def retrieve(spec: ModelSpec, catalog: Catalog, queries: list[str], k: int, settings: EncodeSettings,
             cache_dir: Path | None = None, spark=None, stored=None, segments: list | None = None) -> tuple[list[list[str]], dict]:
    """Top-k product ids (best first) per query over the whole catalog, and facts about the run. `segments`: each
    query's segment (head/torso/tail or None), a feature of the `ranked` specs. Tier-1 scores (`+ce`, `ranked`) are
    cached beside `cache_dir`."""
    if not len(catalog):
        raise ValueError("the catalog is empty")
    if spec.kind == "ranked" or spec.rerank:
        return _reranked(spec, catalog, queries, k, settings, cache_dir, spark, stored, segments)
    if spec.fusion:
        dense, info = retrieve(dataclasses.replace(spec, fusion=None), catalog, queries, k, settings, cache_dir, spark, stored)
        lexical, lexical_info = retrieve(ModelSpec("bm25", "bm25", "bm25"), catalog, queries, k, settings)
        fused = [reciprocal_rank_fusion([d, b], k) for d, b in zip(dense, lexical)]
        return fused, {**info, "retriever": f"hybrid: {spec.fusion}, rank constant {RRF_RANK_CONSTANT}",
                       "bm25_search_s": lexical_info["search_s"]}
    if spec.kind == "bm25":
        started = time.perf_counter()
        hits = catalog.bm25.search(list(queries), k)
        info = {"retriever": "bm25 (annomine.retrievers.bm25)", "search_s": round(time.perf_counter() - started, 2)}
        return [[pid for pid, _ in row] for row in hits], info
    items, info = catalog_embeddings(spec, catalog, settings, cache_dir, spark=spark, stored=stored)
    encoder = worker_encoder(spec.kind, spec.path, settings)  # loaded once per process, then reused
    query_vectors = encoder.encode_queries(list(queries), batch_size=settings.batch_size)
    rows, index_info = retrieve_dense(items, query_vectors, k, settings.index)
    info.update({"retriever": "dense", "index": index_info})
    ids = catalog.ids
    return [[ids[int(i)] for i in row if i >= 0] for row in rows], info
