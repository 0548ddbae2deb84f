"""The three retrieval channels on a tiny catalog, their Spark wrapper, and the channels job end to end."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from annomine.retrievers.analysis import analyze, stem
from annomine.retrievers.bm25 import BM25Retriever
from annomine.retrievers.lexical import LexicalRetriever
from spark_udfs import retrieval as udfs
from tests.conftest import write_tsv

CATALOG = [
    ("p1", "Red Accent Pillow", "A soft red pillow for the sofa.", ""),
    ("p2", "Accent Red Pillow Cover", "Cover only, no insert.", ""),
    ("p3", "Blue Accent Pillows", "Set of two blue pillows.", ""),
    ("p4", "Garden Hose 50 ft", "Kink-free rubber garden hose with nozzle.", ""),
    ("p5", "Cushion", "Decorative cushion.", "color: red; type: accent pillow"),
    ("p6", "Stainless Steel Water Bottle", "Keeps drinks cold for 24 hours.", ""),
    ("p7", "Running Shoes for Men", "Lightweight running shoe with foam sole.", ""),
    ("p8", "Garden Hose Reel", "Wall-mounted reel for hoses up to 100 ft.", ""),
]
IDS = [c[0] for c in CATALOG]
TITLES = [c[1] for c in CATALOG]
DESCS = [c[2] for c in CATALOG]
ATTRS = [c[3] for c in CATALOG]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 1-layer BERT with MiniLM's tokenizer: real encoder code, fast."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from annomine.encoders import minilm_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def test_analysis_normalises_and_stems():
    assert stem("pillows") == stem("pillow") == "pillow"
    assert stem("batteries") == "battery"
    assert analyze("Café 16GB Running-Shoes & the Boxes") == ["cafe", "16", "gb", "run", "shoe", "box"]


def test_lexical_ranks_by_coverage_then_phrase():
    lex = LexicalRetriever(IDS, TITLES, ATTRS)
    hits = lex.search_one("red accent pillows", k=10)
    ids = [p for p, _ in hits]
    scores = [s for _, s in hits]
    assert ids[0] == "p1"  # full coverage + phrase in the title
    assert scores == sorted(scores, reverse=True)
    full = {p for p, s in hits if s >= 1.0}
    assert full == {"p1", "p2", "p5"}  # every term, in title or attributes (p5 only via attributes)
    assert ids.index("p2") < ids.index("p3")  # 3/3 terms beats 2/3
    assert "p4" not in ids and "p6" not in ids  # no shared term: not retrieved
    # Both hose titles match the phrase; the one with fewer other words ranks first. k caps the list.
    assert lex.search(["garden hoses", "quantum flux"], k=1) == [[("p8", pytest.approx(1.31, abs=0.01))], []]


def test_bm25_scores_and_pickles():
    bm = BM25Retriever(IDS, [f"{t} {d}" for t, d in zip(TITLES, DESCS)])
    res = bm.search(["garden hose nozzle", "zzzz unknown", "running shoe"], k=3)
    assert res[0][0][0] == "p4" and {p for p, _ in res[0]} == {"p4", "p8"}
    assert [s for _, s in res[0]] == sorted([s for _, s in res[0]], reverse=True) and all(s > 0 for _, s in res[0])
    assert res[1] == []
    assert [p for p, _ in res[2]] == ["p7"]
    again = pickle.loads(pickle.dumps(bm)).search(["garden hose nozzle"], k=3)
    assert again[0] == res[0]


def test_ann_finds_identical_text_and_pickles(tiny_bert):
    from annomine.retrievers.ann import ANNRetriever

    texts = [f"{t} | {d}" for t, d in zip(TITLES, DESCS)]
    ann = ANNRetriever.from_texts(IDS, texts, encoder=tiny_bert, max_length=32)
    res = ann.search([texts[5], texts[3]], k=4)
    assert [len(r) for r in res] == [4, 4]
    assert res[0][0][0] == "p6" and res[0][0][1] == pytest.approx(1.0, abs=1e-4)
    assert res[1][0][0] == "p4"
    shipped = pickle.loads(pickle.dumps(ann))
    again = shipped.search([texts[5]], k=4)[0]  # alone in its batch: padding changes the floats slightly
    assert [p for p, _ in again] == [p for p, _ in res[0]]
    assert [s for _, s in again] == pytest.approx([s for _, s in res[0]], abs=1e-4)
    hnsw = ANNRetriever(IDS, ann.index.reconstruct_n(0, len(IDS)), encoder=tiny_bert, max_length=32, index="hnsw")
    assert hnsw.search([texts[5]], k=2)[0][0][0] == "p6"


def test_search_batches_ships_index_once(spark):
    bm = BM25Retriever(IDS, [f"{t} {d}" for t, d in zip(TITLES, DESCS)])
    shipped = udfs.ship(bm)
    before = udfs.LOADS["count"]
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(700)],
                            "query": ["garden hose", "red pillow", "nothing here at all", "water bottle"] * 175})
    out = (spark.createDataFrame(queries).repartition(3)
           .mapInPandas(udfs.search_batches(shipped, "bm25", 3), udfs.OUTPUT_SCHEMA).toPandas())
    assert udfs.LOADS["count"] - before == 1  # several batches and partitions, one unpickle
    assert set(out["channel"]) == {"bm25"}
    assert out["query_id"].nunique() == 525  # the 175 no-match queries log nothing
    for _, g in out.groupby("query_id"):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1)) and g["product_id"].is_unique


QUERY_ROWS = [["1", "red accent pillow"], ["2", "garden hose"], ["3", "water bottle"]]


def _ingest_catalog(ctx, folder, titles=TITLES, queries=QUERY_ROWS):
    from jobs.ingest import IngestConfig
    from jobs.ingest import run as ingest
    from annomine.sources import SourceConfig
    from tests.test_query_log import TITLES as MORE_TITLES  # enough repeated types and brands for the builder

    rows = [[i, t, d, a] for i, t, d, a in zip(IDS, titles, DESCS, ATTRS)]
    rows += [[f"x{i}", t, "", ""] for i, t in enumerate(MORE_TITLES)]
    write_tsv(folder / "products.tsv", ["product_id", "title", "description", "attributes"], rows)
    write_tsv(folder / "queries.tsv", ["query_id", "query"], queries)
    ingest(ctx, IngestConfig(products=SourceConfig(path=str(folder / "products.tsv")),
                             queries=SourceConfig(path=str(folder / "queries.tsv"))))


def test_channels_job_end_to_end(ctx, tmp_path, tiny_bert, capsys):
    from jobs.channels import ChannelsConfig
    from jobs.channels import run as channels

    _ingest_catalog(ctx, tmp_path / "shop")
    cfg = ChannelsConfig(top_k=4, n_built_queries=6, encoder=tiny_bert, max_length=32, mlflow=False,
                         report_dir=str(tmp_path / "reports"), report_k=4)
    result = channels(ctx, cfg)
    logs = ctx.tables.read("retrieval_logs").toPandas()
    assert set(logs["channel"]) == {"lexical", "bm25", "ann"}
    assert set(logs["run_id"]) == {cfg.run_id()}
    assert not logs.duplicated(["run_id", "query_id", "channel", "product_id"]).any()
    for _, g in logs.groupby(["query_id", "channel"]):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1)) and len(g) <= 4
        assert list(g.sort_values("rank")["score"]) == sorted(g["score"], reverse=True)
    queries = ctx.tables.read("queries").toPandas()
    built = queries[queries["origin"] == "built"]
    assert len(built) == 6 and built["query_id"].str.startswith("b-").all() and built["segment"].notna().all()
    assert (logs[logs["channel"] == "ann"].groupby("query_id").size() == 4).all()
    assert set(logs[logs["channel"] == "ann"]["query_id"]) == set(queries["query_id"])  # ANN answers every query
    emb = ctx.tables.read("product_embeddings").toPandas()
    assert len(emb) == len(IDS) + 16 and emb["embedding"].map(len).eq(32).all()
    assert all(f.exists() for f in result["report_files"])
    assert {"jaccard_lexical_bm25", "only_one"} <= set(result["per_query"].columns)
    assert "channel overlap" in capsys.readouterr().out

    # Re-run: nothing recomputed, nothing duplicated.
    channels(ctx, cfg)
    out = capsys.readouterr().out
    assert "ann: all 9 queries already logged" in out and "to encode" not in out  # ANN answers every query
    assert len(ctx.tables.read("retrieval_logs").toPandas()) == len(logs)

    # A changed product: re-encoded alone, the run's rows replaced, still no duplicates.
    titles = list(TITLES)
    titles[3] = "Garden Hose 75 ft heavy duty"
    _ingest_catalog(ctx, tmp_path / "shop2", titles)
    channels(ctx, cfg)
    out = capsys.readouterr().out
    assert "1 to encode" in out and "replacing the run's" in out
    after = ctx.tables.read("retrieval_logs").toPandas()
    assert after["source"].nunique() == 3 and not after.duplicated(["run_id", "query_id", "channel", "product_id"]).any()


def test_a_query_whose_text_changed_is_logged_again_alone(ctx, tmp_path, capsys):
    from jobs.channels import ChannelsConfig
    from jobs.channels import run as channels

    _ingest_catalog(ctx, tmp_path / "shop")
    cfg = ChannelsConfig(channels=["lexical", "bm25"], top_k=3, mlflow=False, report_dir=str(tmp_path / "reports"),
                         report_k=3)
    channels(ctx, cfg)
    before = ctx.tables.read("retrieval_logs").toPandas()
    _ingest_catalog(ctx, tmp_path / "shop2", queries=[["1", "running shoes"], *QUERY_ROWS[1:]])
    capsys.readouterr()
    channels(ctx, cfg)
    out = capsys.readouterr().out
    assert "lexical: 1 queries changed their text since they were logged; their rows are replaced" in out
    after = ctx.tables.read("retrieval_logs").toPandas()
    assert not after.duplicated(["run_id", "query_id", "channel", "product_id"]).any()
    assert set(after[after["query_id"] == "1"]["query"]) == {"running shoes"}
    assert after[(after["query_id"] == "1") & (after["rank"] == 1)]["product_id"].tolist() == ["p7", "p7"]
    untouched = ["query_id", "channel", "product_id", "rank", "logged_at"]
    assert (after[after["query_id"] != "1"][untouched].sort_values(untouched).reset_index(drop=True)
            .equals(before[before["query_id"] != "1"][untouched].sort_values(untouched).reset_index(drop=True)))
