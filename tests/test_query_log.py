"""The query-log builder: catalog-only sampling, query kinds, ids, frequencies and segments."""

from __future__ import annotations

import random

import pandas as pd

from annomine.demo_shop import generate_products
from annomine.ingestion import assign_segments
from annomine.query_log import attributes_of, build_query_log, candidates, find_brands, misspell, product_types
from annomine.retrievers.analysis import normalise

TITLES = [
    "Samsung Galaxy Phone Case - Black", "Samsung Wireless Charger", "Samsung 32GB Memory Card",
    "Otterbox Defender Phone Case, Blue", "Otterbox Commuter Phone Case", "Otterbox Symmetry Tablet Case",
    "Red Accent Pillow with Heart Design", "Blue Accent Pillow", "Decorative Accent Pillow - Grey",
    "Stainless Steel Coffee Maker", "Black Coffee Maker with Grinder", "Cuisinart 12-Cup Coffee Maker",
    "Cuisinart Stand Mixer", "Cuisinart Hand Blender", "Leather Office Chair", "Wooden Dining Chair",
]


def _catalog(n: int = 400) -> pd.DataFrame:
    products = generate_products(n, random.Random(3), 3)
    frame = pd.DataFrame({"product_id": [p.product_id for p in products], "title": [p.title for p in products]})
    extra = pd.DataFrame({"product_id": [f"x{i}" for i in range(len(TITLES))], "title": TITLES})
    return pd.concat([frame, extra], ignore_index=True)


def test_catalog_parsing():
    assert product_types("Red Accent Pillow with Heart Design") == ["pillow", "accent pillow"]
    assert product_types("Otterbox Defender Phone Case, Blue") == ["case", "phone case"]
    assert set(attributes_of("Samsung 32GB Memory Card - Black Stainless Steel")) == {"black", "stainless steel", "32 gb"}
    brands = find_brands(TITLES, {"case", "phone", "pillow", "maker", "coffee", "chair", "accent"})
    assert {"samsung", "otterbox", "cuisinart"} <= brands and "red" not in brands and "blue" not in brands


def test_misspellings_are_single_typos():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(50):
        typo = misspell("coffee maker", rng)
        if typo is None:
            continue
        assert typo != "coffee maker" and len(typo.split()) == 2
        assert abs(len(typo) - len("coffee maker")) <= 1
    assert misspell("tv 4k", rng) is None  # no word long enough to misspell


def test_build_query_log(spark):
    catalog = _catalog()
    log = build_query_log(catalog, 300, seed=5)
    assert len(log) == 300
    assert log["query_id"].str.match(r"^b-[0-9a-f]{12}$").all() and log["query_id"].is_unique and log["query"].is_unique
    assert {"type", "brand_type", "attribute_type", "brand", "misspelling"} <= set(log["kind"])
    assert (log["frequency"] >= 1).all() and log["frequency"].max() >= 100 * log["frequency"].median()
    vocab = set(" ".join(normalise(t) for t in catalog["title"]).replace("-", " ").split())
    vocab |= {w for t in catalog["title"] for a in attributes_of(t) for w in a.split()}
    clean = log[log["kind"] != "misspelling"]
    assert all(set(q.split()) <= vocab for q in clean["query"]), "every clean query comes from catalog words"
    typos = log[log["kind"] == "misspelling"]
    assert len(typos) > 0 and not (set(typos["query"].str.split().explode()) <= vocab)
    # Deterministic for a seed, different for another.
    assert build_query_log(catalog, 300, seed=5).equals(log)
    assert not build_query_log(catalog, 300, seed=6)["query"].equals(log["query"])
    # Frequencies give head, torso and tail segments.
    segs = assign_segments(spark.createDataFrame(log[["query_id", "query", "frequency"]])).toPandas()
    counts = segs["segment"].value_counts()
    assert set(counts.index) == {"head", "torso", "tail"} and counts["head"] < counts["torso"] < counts["tail"]
    assert build_query_log(catalog, 0).empty


def test_candidates_support_counts():
    cands = candidates(pd.DataFrame({"product_id": [str(i) for i in range(len(TITLES))], "title": TITLES}))
    support = {(k, q): n for k, q, n in cands.itertuples(index=False)}
    assert support[("type", "case")] == 4 and support[("type", "coffee maker")] == 3
    assert support[("brand_type", "otterbox phone case")] == 2
    assert support[("attribute_type", "black coffee maker")] == 1
