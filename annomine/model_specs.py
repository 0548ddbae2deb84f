"""Evaluated models: a model spec string -> what it names, and its top-k product ids per query over the whole catalog.

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
The catalog's embeddings and the encoders: annomine/evaluation/catalog.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

from annomine.evaluation.catalog import (BASELINES, TWO_TOWER_META, Catalog, EncodeSettings, ModelSpec, ModelSpecError,
                                         catalog_embeddings, worker_encoder)
from annomine.evaluation.index import retrieve_dense
from annomine.evaluation.metrics import HYBRID_SUFFIX

CE_SUFFIX = "+ce"
RANKED_SPECS = ("ranked", "ranked-raw", "ranked-no-ce")  # = annomine.ranking.store.VARIANT_FILES
RRF_RANK_CONSTANT = 60
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "dbfs:/")

__all__ = ["Catalog", "EncodeSettings", "ModelSpec", "ModelSpecError", "resolve_specs", "retrieve",
           "reciprocal_rank_fusion", "models_dir", "download_mlflow_model"]


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
        from annomine.tracking import use_tracking_store

        use_tracking_store(tracking_uri)
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
