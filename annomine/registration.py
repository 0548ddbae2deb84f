"""The pipeline's final model in the MLflow model registry: the evaluated model with the best dev NDCG@10.

A two-tower is registered as a pyfunc that encodes text with either tower; the rank stage's ranked list
(retriever + ranker + catalog, annomine/ranking/serving.py) as a pyfunc that takes queries and returns ranked
product ids.
"""

from __future__ import annotations

import logging
from pathlib import Path

from annomine import quiet
from annomine.evaluation.report import metric_key
from annomine.evaluation.metrics import METRICS
from annomine.tracking import use_tracking_store

log = logging.getLogger(__name__)


def _two_tower_pyfunc():
    import mlflow.pyfunc

    with quiet.pyfunc_definition_muted():
        class TwoTowerPyfunc(mlflow.pyfunc.PythonModel):
            """Encodes a DataFrame column `text` with the query (default) or item tower (`side` param)."""

            def load_context(self, context):
                from annomine.two_tower import TwoTower

                self.model = TwoTower.load(context.artifacts["model"])

            def predict(self, context, model_input, params=None):
                side = (params or {}).get("side", "query")
                texts = model_input["text"].astype(str).tolist()
                emb = self.model.encode_queries(texts) if side == "query" else self.model.encode_items(texts)
                return [row.tolist() for row in emb]

    return TwoTowerPyfunc()


def _reranked_pyfunc():
    import mlflow.pyfunc

    with quiet.pyfunc_definition_muted():
        class RerankedListPyfunc(mlflow.pyfunc.PythonModel):
            """The two-tower's top-K over the packaged catalog, reordered by the judge's tier-1 expected grade."""

            def load_context(self, context):
                import tempfile

                import pandas as pd

                from annomine.evaluation.catalog import Catalog, ModelSpec

                art, config = context.artifacts, context.model_config
                rows = pd.read_parquet(art["catalog"])
                self.catalog = Catalog(rows["product_id"].astype(str).tolist(), rows["text"].astype(str).tolist())
                self.spec = ModelSpec("reranked", "folder", "registry", path=str(Path(art["retriever"]).resolve()),
                                      rerank=str(Path(art["judge"]).resolve()))
                self.top_k = int(config["top_k"])
                self._cache = tempfile.TemporaryDirectory(prefix="annomine-reranked-")  # the catalog's embeddings

            def predict(self, context, model_input, params=None):
                import pandas as pd

                from annomine.evaluation.catalog import EncodeSettings
                from annomine.model_specs import retrieve

                frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"query": list(model_input)})
                k = int((params or {}).get("k", 10))
                lists, _ = retrieve(self.spec, self.catalog, frame["query"].astype(str).tolist(), self.top_k,
                                    EncodeSettings(), Path(self._cache.name) / "embeddings")
                return [ids[:k] for ids in lists]

    return RerankedListPyfunc()


def log_reranked_model(spec, catalog, top_k: int, name: str = "reranked_list"):
    """Log a two-tower's list reranked by tier 1 (`best+ce`) as a pyfunc in the active run: query in, ids out."""
    import tempfile

    import mlflow
    import pandas as pd

    from annomine.ranking.serving import request_signature

    with tempfile.TemporaryDirectory() as tmp:
        catalog_file = Path(tmp) / "catalog.parquet"
        pd.DataFrame({"product_id": catalog.ids, "text": catalog.texts}).to_parquet(catalog_file, index=False)
        artifacts = {"retriever": spec.path, "judge": spec.rerank, "catalog": str(catalog_file)}
        return mlflow.pyfunc.log_model(name=name, python_model=_reranked_pyfunc(), artifacts=artifacts,
                                       model_config={"top_k": top_k}, signature=request_signature(),
                                       pip_requirements=["annomine"])


# Which list is registered when two tie on dev: the simpler one to serve.
SIMPLICITY = {"two_tower": 2, "reranked": 1, "ranked": 0}


def registration_candidates(report: dict, specs: dict, references: tuple = (), with_lists: bool = True) -> list:
    """(dev NDCG@10, kind, report entry, spec) of every evaluated model that may become the final model.

    The pipeline's two-towers (`two_tower`), and with `with_lists` a two-tower's list reordered by the judge's tier 1
    (`reranked`, `best+ce`) and the rank stage's ranked list (`ranked`, not its ablations). Never a baseline, a
    hybrid, or a reference the others are compared with (`evaluate.compare_with`, such as `human`)."""
    out = []
    for model in report["models"]:
        spec, dev = specs.get(model["label"]), model.get("dev_ndcg@10")
        if spec is None or dev is None or model["label"] in references or spec.fusion:
            continue
        if spec.kind == "ranked":
            kind = "ranked" if spec.source == "ranked" and with_lists else None
        elif spec.rerank:
            kind = "reranked" if spec.two_tower and with_lists and not spec.baseline else None
        else:
            kind = "two_tower" if spec.two_tower and not spec.baseline else None
        if kind is not None:
            out.append((dev, kind, model, spec))
    return out


def final_choice(candidates: list) -> tuple:
    """The candidate with the best dev NDCG@10; on a tie the simpler list (two-tower, then reranked, then ranked)."""
    return max(candidates, key=lambda c: (c[0], SIMPLICITY[c[1]]))


def _log_final_model(kind: str, spec, catalog, top_k: int) -> str:
    """Log the chosen list as a pyfunc model in the active run (unless it already has an MLflow URI); its URI."""
    import mlflow

    if kind == "ranked":
        from annomine.ranking.serving import log_ranked_model
        from annomine.ranking.store import from_folder

        return log_ranked_model(from_folder(Path(spec.path)), catalog).model_uri
    if kind == "reranked":
        return log_reranked_model(spec, catalog, top_k).model_uri
    if spec.model_uri and spec.model_uri.startswith(("runs:/", "models:/")):
        return spec.model_uri
    return mlflow.pyfunc.log_model(name="two_tower", python_model=_two_tower_pyfunc(), artifacts={"model": spec.path},
                                   pip_requirements=["annomine"]).model_uri


def register_best(report: dict, specs: dict, tracking_uri: str, experiment: str, registered_name: str,
                  report_file: Path | None = None, catalog=None, references: tuple = ()) -> dict:
    """Register the list with the best dev NDCG@10 in the MLflow model registry (`registration_candidates`): a
    two-tower, or, when a `catalog` is given to package with it, the two-tower's list reranked by the judge or the
    rank stage's ranked list. Dev NDCG@10 is the mean over the evaluated queries whose split is `dev`; without dev
    queries nothing is registered. On a tie the simpler list wins. The version carries the evaluation as tags and
    the report JSON as an artifact of its run.
    """
    import mlflow

    candidates = registration_candidates(report, specs, references, with_lists=catalog is not None)
    if not candidates:
        return {"registered": False, "reason": "no two-tower with dev queries among the evaluated models"}
    dev, kind, model, spec = final_choice(candidates)
    use_tracking_store(tracking_uri)
    mlflow.set_experiment(experiment)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=f"register {model['label']}", nested=nested) as run:
        if report_file is not None:
            mlflow.log_artifact(str(report_file), artifact_path="evaluation")
        mlflow.log_metric("dev_ndcg_at_10", dev)
        uri = _log_final_model(kind, spec, catalog, int(report.get("recall_k") or 100))
        tags = {"dev_ndcg_at_10": f"{dev:.4f}", "evaluation_run_id": run.info.run_id, "evaluation_split": report["split"],
                "evaluation_json": f"runs:/{run.info.run_id}/evaluation/{report_file.name}" if report_file else "",
                "model_label": model["label"], "model_kind": kind}
        for metric in METRICS:
            mean = (model["metrics"]["all"].get(metric) or {}).get("mean")
            if mean is not None:
                tags[metric_key(metric)] = f"{mean:.4f}"
        with quiet.mlflow_prints_muted():  # the registration is reported once, by the summary
            version = mlflow.register_model(uri, registered_name, tags=tags)
    log.info("registered %s as %s version %s (dev NDCG@10 %.4f)", model["label"], registered_name, version.version, dev)
    return {"registered": True, "name": registered_name, "version": str(version.version), "model": model["label"],
            "kind": kind, "source_uri": uri, "dev_ndcg@10": dev, "run_id": run.info.run_id}
