"""The scale sheet's projection (benchmarks/projection.py) against numbers worked out by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_projection", ROOT / "benchmarks" / "projection.py")
projection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(projection)

CLUSTER = {"spark": {"executors": 64, "cores_per_executor": 8, "efficiency": 0.5},
           "gpu": {"count": 8, "core_equivalent": 200}}
LLM = {"escalation_share": 0.25, "prompt_tokens": 300, "completion_tokens": 30, "requests_per_s": 50,
       "price": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60, "batch_discount": 0.5}}


def test_fit_power_exact_and_least_squares():
    a, b = projection.fit_power([10, 100, 1000], [2 * 10**1.5, 2 * 100**1.5, 2 * 1000**1.5])
    assert a == pytest.approx(2.0) and b == pytest.approx(1.5)
    # log10 points (0, 0), (1, 1), (2, 3): slope 3 / 2 = 1.5, intercept 4/3 - 1.5 = -1/6
    a, b = projection.fit_power([1, 10, 100], [1, 10, 1000])
    assert b == pytest.approx(1.5) and a == pytest.approx(10 ** (-1 / 6))
    with pytest.raises(ValueError):
        projection.fit_power([1, 10], [0.0, 1.0])


def test_carried_is_linear_below_one_and_keeps_a_larger_exponent():
    assert projection.carried(1000, 10.0, 0.8, 1e6) == pytest.approx(10_000.0)
    assert projection.carried(1000, 10.0, 1.2, 1e6) == pytest.approx(10 * 1000**1.2)  # 39,810.7


def test_spark_stage():
    row = projection.stage_row("mine", {"size": 1e6, "cpu_seconds": 100.0}, 1.0, 1.2e9, "spark", CLUSTER)
    assert row["core_hours"] == pytest.approx(120_000 / 3600)          # 33.33 core-hours
    assert row["hours"] == pytest.approx(120_000 / 256 / 3600)         # 512 cores at 0.5: 0.1302 h
    assert row["resources"] == "512 cores"


def test_gpu_stage_and_its_cpu_alternative():
    row = projection.stage_row("grade", {"size": 5000, "cpu_seconds": 500.0}, 0.9, 240e6, "gpu", CLUSTER)
    assert row["core_hours"] == pytest.approx(24e6 / 3600)             # 0.1 core-s a pair x 240M
    assert row["hours"] == pytest.approx(24e6 / 200 / 8 / 3600)        # 4.167 h on 8 GPUs
    assert row["gpu_hours"] == pytest.approx(24e6 / 200 / 3600)        # 33.3 GPU-hours
    assert row["cpu_cluster_hours"] == pytest.approx(24e6 / 256 / 3600)  # 26.04 h on the 512 cores
    with pytest.raises(ValueError):
        projection.stage_row("x", {"size": 1, "cpu_seconds": 1.0}, 1.0, 10, "tpu", CLUSTER)


def test_sharded_index_build_and_search():
    build = projection.stage_row("faiss_build", {"size": 1e5, "cpu_seconds": 64.0}, 1.0, 6.4e6, "shards", CLUSTER)
    assert build["hours"] == pytest.approx(64 / 8 / 3600)               # one 100k shard per executor, 8 cores
    assert build["core_hours"] == pytest.approx(64 * 64 / 3600)
    search = projection.stage_row("faiss_search", {"size": 1e5, "cpu_seconds": 2.0}, 0.5, 6.4e6, "shard_search",
                                  CLUSTER, per_queries=1000, queries=4e6)
    # 2 s per 1,000 queries per shard (b 0.5 carried linearly: same shard size), 64 shards, 4M queries
    assert search["core_hours"] == pytest.approx(2 * 64 * 4000 / 3600)
    assert search["hours"] == pytest.approx(512_000 / 256 / 3600)


def test_llm_calls_tokens_hours_and_price():
    row = projection.llm_row(240e6, LLM)
    assert row["calls"] == pytest.approx(60e6)
    assert row["prompt_tokens"] == pytest.approx(18e9) and row["completion_tokens"] == pytest.approx(1.8e9)
    assert row["usd"] == pytest.approx(2700 + 1080)
    assert row["usd_batch"] == pytest.approx(1890)
    assert row["hours"] == pytest.approx(60e6 / 50 / 3600)             # 333.3 h


def test_project_uses_the_largest_point_and_the_stated_sizes():
    spec = {"paper": {"products": 5e6, "graded_examples": 240e6, "epochs": 2, "queries": 4e6, "channels": 3,
                      "top_k": 100},
            "cluster": CLUSTER, "llm": LLM,
            "stages": {"mine": {"size": "log_rows", "runs_on": "spark"}, "train": {"size": "examples", "runs_on": "gpu"},
                       "encode": {"size": "products", "runs_on": "gpu"}}}
    measured = {"mine": {"points": [{"size": 1e4, "cpu_seconds": 5.0}, {"size": 1e6, "cpu_seconds": 100.0},
                                    {"size": 1e5, "cpu_seconds": 12.0}], "b_cpu": 0.65},
                "train": {"points": [{"size": 3200, "cpu_seconds": 320.0}], "b_cpu": 1.0}}
    rows = {r["stage"]: r for r in projection.project(measured, spec)}
    assert set(rows) == {"mine", "train", "LLM tiers"}                  # encode was not measured: no row
    assert rows["mine"]["paper_size"] == pytest.approx(1.2e9)
    assert rows["mine"]["core_hours"] == pytest.approx(100 * 1200 / 3600)
    assert rows["train"]["paper_size"] == pytest.approx(480e6)          # two epochs
    assert rows["train"]["hours"] == pytest.approx(0.1 * 480e6 / 200 / 8 / 3600)


def test_the_committed_spec_names_known_sizes_and_placements():
    spec = yaml.safe_load((ROOT / "benchmarks" / "scale_cluster.yaml").read_text())
    sizes = projection.paper_sizes(spec["paper"])
    for how in spec["stages"].values():
        assert how["size"] in sizes
        assert how["runs_on"] in ("spark", "gpu", "shards", "shard_search")


def test_the_sheet_replaces_its_own_block_only():
    spec = importlib.util.spec_from_file_location("bench_scale_render", ROOT / "benchmarks" / "scale_render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    first = render.write_section("# Benchmarks\n\nintro\n", "SHEET 1")
    assert first.count(render.START) == 1 and "## Scale sheet" in first and "SHEET 1" in first
    second = render.write_section(first + "\n## Later\n", "SHEET 2")
    assert "SHEET 1" not in second and "SHEET 2" in second
    assert second.index("SHEET 2") < second.index("## Later") and second.count("## Scale sheet") == 1
