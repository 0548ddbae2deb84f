"""Labelled (query, product) pairs from files or tables, and the grading metrics the judge reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from annomine.splits import bucket, split_of
from annomine.text import product_text, repair_mojibake

PAIR_COLUMNS = ["query_id", "query", "product_id", "text", "grade", "variance"]


def _read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path).astype({"query_id": str}, errors="ignore")
    sep = "\t" if suffix in (".tsv", ".txt") else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def _require(df: pd.DataFrame, cols: list[str], path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")


def load_pairs_from_files(queries: str | Path, labels: str | Path, products: str | Path,
                          min_grade: int = 1, max_grade: int = 4) -> pd.DataFrame:
    """Labelled pairs in the CrowdFlower layout: queries(query_id, query), labels(query_id, product_id,
    grade[, variance]), products(product_id, title[, description, attributes, brand, category]).

    A label whose grade is not an integer in [min_grade, max_grade], or whose query or product is
    unknown, is an error naming the file and row: the judge is never measured on a silently
    shrunken set.
    """
    q = _read_table(queries)
    lab = _read_table(labels)
    p = _read_table(products)
    _require(q, ["query_id", "query"], queries)
    _require(lab, ["query_id", "product_id", "grade"], labels)
    _require(p, ["product_id", "title"], products)
    for col in ("description", "attributes", "brand", "category"):
        if col not in p.columns:
            p[col] = ""
    p = p.fillna("")
    attrs = [" ; ".join(x for x in (b, c, a) if x) for b, c, a in zip(p["brand"], p["category"], p["attributes"])]
    p["text"] = [product_text(repair_mojibake(t).strip(), at, repair_mojibake(d))
                 for t, at, d in zip(p["title"], attrs, p["description"])]
    q["query"] = [repair_mojibake(x).strip() for x in q["query"]]
    lab = lab.copy()
    grades = pd.to_numeric(lab["grade"], errors="coerce")
    bad = lab.index[grades.isna() | (grades != grades.round()) | (grades < min_grade) | (grades > max_grade)]
    if len(bad):
        i = bad[0]
        raise ValueError(f"{labels}: row {i + 2}: grade {lab.loc[i, 'grade']!r} is not an integer in [{min_grade}, {max_grade}]")
    lab["grade"] = grades.astype(int)
    lab["variance"] = pd.to_numeric(lab["variance"], errors="coerce") if "variance" in lab.columns else np.nan
    df = lab.merge(q[["query_id", "query"]].drop_duplicates("query_id"), on="query_id", how="left")
    df = df.merge(p[["product_id", "text"]].drop_duplicates("product_id"), on="product_id", how="left")
    for col, path in (("query", queries), ("text", products)):
        missing = df.index[df[col].isna()]
        if len(missing):
            i = missing[0]
            raise ValueError(f"{labels}: row {i + 2}: {'query_id' if col == 'query' else 'product_id'} "
                             f"{df.loc[i, 'query_id' if col == 'query' else 'product_id']!r} not found in {path}")
    return df[PAIR_COLUMNS].drop_duplicates(["query_id", "product_id"]).reset_index(drop=True)


def load_pairs_from_tables(tables) -> pd.DataFrame:
    """Labelled pairs from the human_labels, queries and products tables."""
    labels = tables.read("human_labels").select("query_id", "product_id", "grade", "variance")
    queries = tables.read("queries").select("query_id", "query")
    products = tables.read("products").select("product_id", "text")
    df = labels.join(queries, "query_id").join(products, "product_id").toPandas()
    df["grade"] = df["grade"].astype(int)
    return df[PAIR_COLUMNS].sort_values(["query_id", "product_id"]).reset_index(drop=True)


def assign_splits(df: pd.DataFrame, calibration_fraction: float = 0.25, seed: int = 13, fold: int = 0,
                  rotation: int = 0) -> pd.Series:
    """'dev' (annomine.splits: judge validation, never trained on), 'test' (reporting only: never
    trained, calibrated or selected on), 'calibration' (a query-disjoint part of the train queries
    for isotonic calibration) or 'train'. `fold` swaps dev and test only (annomine/splits.py): train and
    calibration, hence the judge, are the same in both folds; another `rotation` holds out other queries, so
    its judge is another one."""
    def which(qid: str) -> str:
        held = split_of(qid, fold=fold, rotation=rotation)
        if held in ("dev", "test"):
            return held
        return "calibration" if bucket(qid, seed=seed + 1000) < calibration_fraction else "train"
    return df["query_id"].astype(str).map(which)


# ---- metrics -------------------------------------------------------------------------------
def confusion(truth, pred, grades: list[int]) -> np.ndarray:
    index = {g: i for i, g in enumerate(grades)}
    m = np.zeros((len(grades), len(grades)), dtype=int)
    for t, p in zip(truth, pred):
        if p is None or (isinstance(p, float) and np.isnan(p)):
            continue
        m[index[int(t)], index[int(p)]] += 1
    return m


def quadratic_weighted_kappa(truth, pred, grades: list[int]) -> float:
    """Cohen's kappa with quadratic weights over the graded pairs (an ungraded `pred` is skipped);
    NaN with no graded pair, 1.0 when truth and prediction are all one and the same grade."""
    pairs = [(int(t), int(p)) for t, p in zip(truth, pred) if not (p is None or (isinstance(p, float) and np.isnan(p)))]
    if not pairs:
        return float("nan")
    if len({g for pair in pairs for g in pair}) == 1:  # no disagreement possible: sklearn's 0/0
        return 1.0
    from sklearn.metrics import cohen_kappa_score

    t, p = zip(*pairs)
    return float(cohen_kappa_score(t, p, weights="quadratic", labels=list(grades)))


def positive_negative(truth, pred, positive_min: int) -> dict:
    """Precision and recall of positives (grade >= positive_min) and of negatives (below it) against the
    human grades, over the graded pairs: the curriculum's view of a grade (>= 3 positive, <= 2 negative)."""
    pairs = [(int(t), int(p)) for t, p in zip(truth, pred) if not (p is None or (isinstance(p, float) and np.isnan(p)))]
    t = np.array([a >= positive_min for a, _ in pairs], dtype=bool)
    p = np.array([b >= positive_min for _, b in pairs], dtype=bool)

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {"positive_precision": ratio((t & p).sum(), p.sum()), "positive_recall": ratio((t & p).sum(), t.sum()),
            "negative_precision": ratio((~t & ~p).sum(), (~p).sum()), "negative_recall": ratio((~t & ~p).sum(), (~t).sum()),
            "positive_min_grade": int(positive_min)}


def grading_metrics(truth, pred, grades: list[int], positive_min: int | None = None) -> dict:
    """Agreement, QWK, within-one, confusion, and positive/negative precision-recall (positives: the
    upper half of the scale unless `positive_min` is given, i.e. >= 3 on 1-4)."""
    truth = np.asarray(list(truth))
    pred_list = list(pred)
    graded = np.array([p is not None and not (isinstance(p, float) and np.isnan(p)) for p in pred_list])
    agree = np.array([g and int(p) == int(t) for g, p, t in zip(graded, pred_list, truth)])
    m = confusion(truth, pred_list, grades)
    lowest = grades[0]
    return {
        "n_pairs": int(len(truth)),
        "n_graded": int(graded.sum()),
        "exact_agreement": float(agree.sum() / max(len(truth), 1)),
        "quadratic_weighted_kappa": quadratic_weighted_kappa(truth, pred_list, grades),
        "within_one": float(sum(1 for g, p, t in zip(graded, pred_list, truth) if g and abs(int(p) - int(t)) <= 1) / max(len(truth), 1)),
        "embarrassing_recall": float(m[0, 0] / max(m[0].sum(), 1)),
        "embarrassing_precision": float(m[0, 0] / max(m[:, 0].sum(), 1)),
        "lowest_grade": lowest,
        **positive_negative(truth, pred_list, positive_min if positive_min is not None else grades[len(grades) // 2]),
        "confusion_matrix": {"grades": grades, "rows_truth_cols_pred": m.tolist()},
    }
