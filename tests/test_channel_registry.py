"""The shared vocabulary and the channel registry: one name list drives schemas, SQL, mining and
overlap; a channel defined here (in this file only) runs through the channels job and the report."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from annomine import curriculum, mining, overlap, vocabulary
from annomine.retrievers import registry
from annomine.retrievers.registry import Channel, ChannelInputs
from annomine.schemas import TABLES


# ---- a toy channel, defined only here --------------------------------------------------------------
@dataclass(frozen=True)
class TitleLengthConfig:
    shortest_first: bool = True


class TitleLengthRetriever:
    """Ignores the query: every product, ranked by title length (then product id)."""

    def __init__(self, product_ids: list[str], titles: list[str | None], shortest_first: bool):
        sign = -1.0 if shortest_first else 1.0
        scored = [(p, sign * len(t or "")) for p, t in zip(product_ids, titles)]
        self.ranking = sorted(scored, key=lambda ps: (-ps[1], ps[0]))

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        return [self.ranking[:k] for _ in queries]


def build_title_length(inputs: ChannelInputs, config: TitleLengthConfig) -> TitleLengthRetriever:
    products = inputs.products
    return TitleLengthRetriever(products["product_id"].tolist(), products["title"].tolist(), config.shortest_first)


TOY = Channel("title_length", build_title_length, TitleLengthConfig)


@pytest.fixture
def toy_channel():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


# ---- the vocabulary -----------------------------------------------------------------------------------
def test_vocabulary_is_the_single_source():
    assert vocabulary.CHANNELS == ("lexical", "bm25", "ann")
    assert vocabulary.CLASS_LEVELS == {"easy_positive": 1, "hard_positive": 2, "hard_negative": 3,
                                       "token_similar_negative": 4, "random_negative": 5}
    assert mining.CLASSES == vocabulary.CLASS_LEVELS and mining.CHANNELS == vocabulary.CHANNELS
    assert curriculum.CLASSES == tuple(mining.CLASSES) and curriculum.POSITIVE_CLASSES == mining.POSITIVE_CLASSES
    assert set(mining.POSITIVE_CLASSES) | set(mining.NEGATIVE_CLASSES) == set(mining.CLASSES)
    assert overlap.PAIRS == [("lexical", "bm25"), ("lexical", "ann"), ("bm25", "ann")]
    cols = TABLES["mined_candidates"].columns
    assert cols[3:9] == ["rank_lexical", "score_lexical", "rank_bm25", "score_bm25", "rank_ann", "score_ann"]
    assert cols == mining.OUTPUT_COLUMNS


def test_views_sql_channel_list_is_generated(monkeypatch, tmp_path):
    from annomine.sql_runner import VIEWS_FILE, default_sql_dir

    text = (default_sql_dir() / VIEWS_FILE).read_text(encoding="utf-8")
    assert mining.render_views_sql(text) == text, "sql/00_views.sql is stale: run annomine.mining.sync_views_sql()"
    copy = tmp_path / VIEWS_FILE
    copy.write_text(text, encoding="utf-8")
    monkeypatch.setattr(mining, "CHANNELS", vocabulary.CHANNELS + ("sparse",))
    assert mining.sync_views_sql(copy) and not mining.sync_views_sql(copy)
    new = copy.read_text(encoding="utf-8")
    assert "CASE WHEN m.rank_ann IS NOT NULL THEN 'ann' END,\n           CASE WHEN m.rank_sparse IS NOT NULL THEN 'sparse' END)" in new
    assert new.replace(",\n           CASE WHEN m.rank_sparse IS NOT NULL THEN 'sparse' END", "") == text


# ---- the registry -------------------------------------------------------------------------------------
def test_builtin_channels_resolve_and_keep_their_run_id():
    from jobs.channels import ChannelsConfig

    assert registry.names() == vocabulary.CHANNELS
    for name, spec in registry.registered().items():
        assert spec.name == name and callable(spec.factory)
    cfg = ChannelsConfig()
    assert cfg.channel_config("bm25") == registry.get("bm25").config(k1=1.5, b=0.75)
    assert cfg.channel_config("ann").model_key == cfg.model_key == "minilm@64"
    # The run id is the one the if-chain version derived (existing retrieval_logs keep resuming).
    assert cfg.run_id() == "ch-90e3049c7e18"
    assert ChannelsConfig(top_k=4, encoder="x", max_length=32, bm25_k1=1.2, ann_index="hnsw").run_id() == "ch-eaf04a1cff9a"
    assert ChannelsConfig(options={"bm25": {"k1": 1.2}}).run_id() == ChannelsConfig(bm25_k1=1.2).run_id()
    with pytest.raises(ValueError, match="ann_index must be flat, hnsw or auto"):
        ChannelsConfig(ann_index="ivf").validate()
    with pytest.raises(ValueError, match="unknown key"):
        ChannelsConfig(options={"bm25": {"k3": 1.0}}).validate()
    with pytest.raises(KeyError, match="unknown channel 'sparse'"):
        registry.get("sparse")


def test_register_checks_names(toy_channel):
    from jobs.channels import ChannelsConfig

    assert registry.names() == vocabulary.CHANNELS + ("title_length",)
    assert registry.pairs(["title_length", "bm25", "lexical"]) == [("lexical", "bm25"), ("lexical", "title_length"),
                                                                   ("bm25", "title_length")]
    ChannelsConfig(channels=["title_length"], options={"title_length": {"shortest_first": False}}).validate()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_channel)
    with pytest.raises(ValueError, match="built-in"):
        registry.register(Channel("bm25", build_title_length))
    with pytest.raises(ValueError, match="channel name"):
        registry.register(Channel("Title Length", build_title_length))
    registry.unregister("title_length")
    with pytest.raises(ValueError, match="non-empty subset"):
        ChannelsConfig(channels=["title_length"]).validate()
    registry.register(toy_channel)


def test_a_new_channel_runs_through_the_job_and_the_report(ctx, tmp_path, toy_channel, capsys):
    from jobs.channels import ChannelsConfig
    from jobs.channels import run as channels
    from tests.test_channels import _ingest_catalog

    _ingest_catalog(ctx, tmp_path / "shop")
    cfg = ChannelsConfig(channels=["lexical", "title_length"], top_k=3, mlflow=False, report_k=3,
                         report_dir=str(tmp_path / "reports"), options={"title_length": {"shortest_first": True}})
    cfg.validate()
    result = channels(ctx, cfg)
    logs = ctx.tables.read("retrieval_logs").toPandas()
    assert set(logs["channel"]) == {"lexical", "title_length"} and set(logs["run_id"]) == {cfg.run_id()}
    toy = logs[logs["channel"] == "title_length"]
    products = ctx.tables.read("products").select("product_id", "title").toPandas()
    shortest = products.assign(n=products["title"].str.len()).sort_values(["n", "product_id"])["product_id"].tolist()[:3]
    queries = ctx.tables.read("queries").toPandas()
    assert set(toy["query_id"]) == set(queries["query_id"])
    for _, g in toy.groupby("query_id"):
        assert g.sort_values("rank")["product_id"].tolist() == shortest
    assert set(toy["source"]) == {toy["source"].iat[0]} and toy["source"].iat[0].startswith("channels/title_length@")
    assert {"n_title_length", "only_title_length", "jaccard_lexical_title_length"} <= set(result["per_query"].columns)
    assert "mean_jaccard_lexical_title_length" in result["summary"]
    out = capsys.readouterr().out
    overlap = next(line for line in out.splitlines() if line.startswith("channel overlap"))
    assert "title_length" in overlap and "title_length: index built" in out  # the new channel in the overlap line
