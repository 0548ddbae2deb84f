"""The ranked list as one MLflow pyfunc model: query text in, ranked product ids out.

The model carries everything it needs as artifacts: the ranker folder, the retriever, the judge (tier 1) and the
catalog (product ids and texts, Parquet). `predict` takes a DataFrame with a `query` column (and optionally
`segment`: head / torso / tail) and returns, per row, the product ids of the ranked list (`params={"k": N}` cuts
it, default 10). The pipeline registers it as its final model when the ranked list has the best dev score (annomine/registration.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from annomine import quiet
from annomine.evaluation.catalog import Catalog
from annomine.ranking.store import PublishedRanker

DEFAULT_K = 10


def _pyfunc(variant: str):
    import mlflow.pyfunc

    with quiet.pyfunc_definition_muted():
        class RankedListPyfunc(mlflow.pyfunc.PythonModel):
            """Retriever + ranker over the packaged catalog."""

            def load_context(self, context):
                from annomine.evaluation.catalog import EncodeSettings
                from annomine.ranking.store import META

                art = context.artifacts
                meta = json.loads((Path(art["ranker"]) / META).read_text())
                meta["judge_path"] = str(Path(art["judge"]).resolve())
                if "retriever" in art:
                    meta["retriever_path"] = str(Path(art["retriever"]).resolve())
                from annomine.ranking.apply import RankedLists

                published = PublishedRanker(Path(art["ranker"]), meta, Path(art["ranker"]))
                rows = pd.read_parquet(art["catalog"])
                catalog = Catalog(rows["product_id"].astype(str).tolist(), rows["text"].astype(str).tolist())
                # the catalog is encoded once per process, into a folder removed when the model or the process goes
                self._cache = tempfile.TemporaryDirectory(prefix="annomine-ranked-")
                self.lists = RankedLists(published, variant, catalog, EncodeSettings(), Path(self._cache.name) / "embeddings",
                                         None)

            def predict(self, context, model_input, params=None):
                frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"query": list(model_input)})
                k = int((params or {}).get("k", DEFAULT_K))
                segments = frame["segment"].tolist() if "segment" in frame.columns else None
                lists, _ = self.lists.rank(frame["query"].astype(str).tolist(), segments)
                return [ids[:k] for ids in lists]

    return RankedListPyfunc()


def log_ranked_model(published: PublishedRanker, catalog: Catalog, variant: str = "ranked", name: str = "ranked_list"):
    """Log the ranked list as a pyfunc model in the active MLflow run; returns MLflow's ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        catalog_file = Path(tmp) / "catalog.parquet"
        pd.DataFrame({"product_id": catalog.ids, "text": catalog.texts}).to_parquet(catalog_file, index=False)
        artifacts = {"ranker": str(published.folder), "judge": str(published.path_of("judge_path")),
                     "catalog": str(catalog_file)}
        retriever = published.path_of("retriever_path")
        if retriever is not None:
            artifacts["retriever"] = str(retriever)
        return mlflow.pyfunc.log_model(name=name, python_model=_pyfunc(variant), artifacts=artifacts,
                                       signature=request_signature(), pip_requirements=["annomine"])


def request_signature():
    """A `query` column (and an optional `segment`) in; the parameter `k` (list length, default 10)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "query"), ColSpec("string", "segment", required=False)]),
                          params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
