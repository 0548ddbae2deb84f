"""The synthetic shop: seeded, never overwriting, and judged on what its retrievers return."""

import csv
import random
from collections import Counter, defaultdict

import pytest

from annomine import demo_shop
from annomine.evaluation.inputs import catalog_from_file
from annomine.retrievers.analysis import analyze
from annomine.retrievers.bm25 import BM25Retriever

# conf/local.yaml's demo shop: the BM25 check is about the catalog the demo really searches
DEMO = {"n_products": 3000, "n_queries": 400, "n_labelled": 120, "seed": 7}


def _read(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shop")
    paths = demo_shop.write_demo_shop(folder, **DEMO)
    judged = defaultdict(dict)
    for row in _read(paths["labels"]):
        judged[row["query_id"]][row["product_id"]] = int(row["grade"])
    return paths, judged


def _generated():
    rng = random.Random(DEMO["seed"])
    products = demo_shop.generate_products(DEMO["n_products"], rng, DEMO["seed"])
    return products, demo_shop.generate_queries(DEMO["n_queries"], rng)


def test_the_same_seed_writes_the_same_files_and_never_overwrites(shop, tmp_path):
    paths, _ = shop
    again = demo_shop.write_demo_shop(tmp_path, **DEMO)
    for name in demo_shop.DEMO_FILES:
        assert again[name].read_bytes() == paths[name].read_bytes()
    before = again["labels"].read_bytes()
    with pytest.raises(FileExistsError):
        demo_shop.write_demo_shop(tmp_path, **DEMO, files=("labels",))
    assert again["labels"].read_bytes() == before


def test_bad_rows_stay_and_no_label_points_at_a_quarantined_product(shop):
    paths, judged = shop
    products = _read(paths["products"])
    ids = Counter(r["product_id"] for r in products)
    assert "" in ids and max(ids.values()) == 2 and any(not r["title"] for r in products)
    conflicting = next(pid for pid, n in ids.items() if n == 2)
    assert all(conflicting not in labels for labels in judged.values())


def test_labels_cover_every_product_of_the_type_or_sharing_a_type_or_brand_word_in_the_department(shop):
    _, judged = shop
    products, queries = _generated()
    vocab = [demo_shop.product_words(p) for p in products]
    assert len(judged) == DEMO["n_labelled"]
    for qid, labels in judged.items():
        q = queries[int(qid)]
        key_words = demo_shop.words(q["query"]) & demo_shop.words(f"{q['ptype']} {q.get('brand') or ''}")
        for p, p_words in zip(products[1:], vocab[1:]):  # products[0] is quarantined (conflicting copy)
            plausible = p.ptype == q["ptype"] or (p.department == q["department"] and key_words & p_words) \
                or (q["shopper_words"] and demo_shop.words(q["query"]) & p_words)
            if plausible:
                assert p.product_id in labels, (q["query"], p.title)
    grades = Counter(g for labels in judged.values() for g in labels.values())
    assert set(grades) == {1, 2, 3, 4}  # the lowest grade is judged too
    # every query's pool is a small part of the catalog, not the catalog
    assert max(len(labels) for labels in judged.values()) < DEMO["n_products"] / 2


def test_labels_cover_what_the_demo_bm25_channel_puts_in_the_top_10(shop):
    paths, judged = shop
    catalog, _ = catalog_from_file(str(paths["products"]))
    text_of = {r["query_id"]: r["query"] for r in _read(paths["queries"])}
    qids = sorted(judged)
    hits = BM25Retriever(catalog.ids, catalog.texts).search([text_of[q] for q in qids], 10)
    products, _ = _generated()
    quarantined = products[0].product_id
    top10 = [(q, pid) for q, row in zip(qids, hits) for pid, _ in row if pid != quarantined]
    assert len(top10) > 8 * len(qids)
    unjudged = [(text_of[q], pid) for q, pid in top10 if pid not in judged[q]]
    assert not unjudged, unjudged[:5]


def test_shopper_words_name_every_type_and_occur_in_no_product_text():
    products, queries = _generated()
    types = {t for spec in demo_shop.DEPARTMENTS.values() for t in spec["types"]}
    assert set(demo_shop.SHOPPER_WORDS) == types
    catalog_terms = set()
    for p in products:
        catalog_terms.update(analyze(f"{p.title} {p.description}"))
    for ptype, names in demo_shop.SHOPPER_WORDS.items():
        for name in names:
            assert not set(analyze(name)) & catalog_terms, (ptype, name)
    # a real share of the traffic, and each such query names its type only in shopper words
    shopper = [q for q in queries if q["shopper_words"]]
    assert 0.3 < len(shopper) / len(queries) < 0.5
    assert not any(demo_shop.words(q["ptype"]) & demo_shop.words(q["query"]) for q in shopper)
