"""The scale sheet's projection: measured stage costs carried to the paper's scale on a stated cluster.

Pure arithmetic, no measurement (benchmarks/scale.py measures; tests/test_scale_projection.py checks the sums).
Each stage's cost was measured at three sizes; `fit_power` fits cost = a * size^b. The projection starts from the
largest measured point and grows it by (N / n_max)^max(b, 1): a stage that measured sub-linear (fixed start-up
costs amortised over more rows) is carried on linearly, one that measured super-linear keeps its exponent.
The cost carried is CPU seconds (all threads of the process), i.e. core-seconds, so the loaded machine's waiting
does not count as work. Where the stage runs (`runs_on`):

- `spark`: core-seconds spread over executors x cores, at the cluster's parallel efficiency.
- `gpu`: core-seconds / `gpu_core_equivalent` (how many of the measured CPU cores one GPU replaces: an ASSUMPTION
  unless measured) spread over the GPUs; the same work on the Spark cores is given beside it.
- `shards`: one index shard per executor, each built on that executor's cores (all shards at once).
- `shard_search`: every query searches every shard; the measured cost is per `per_queries` queries.

LLM calls = graded pairs x escalation share; hours at the endpoint's allowed requests/s; USD at the price table.
"""

from __future__ import annotations

import math

import numpy as np

HOUR = 3600.0


def fit_power(sizes, costs) -> tuple[float, float]:
    """(a, b) of cost = a * size^b, least squares on log(cost) = log(a) + b log(size)."""
    sizes, costs = np.asarray(sizes, dtype=float), np.asarray(costs, dtype=float)
    if len(sizes) < 2 or np.any(sizes <= 0) or np.any(costs <= 0):
        raise ValueError("need two or more positive (size, cost) points")
    b, log_a = np.polyfit(np.log(sizes), np.log(costs), 1)
    return float(math.exp(log_a)), float(b)


def carried(size: float, cost: float, b: float, n: float) -> float:
    """The cost at `n` from the measured (`size`, `cost`): grown by (n / size)^max(b, 1)."""
    return cost * (n / size) ** max(b, 1.0)


def spark_cores(cluster: dict) -> int:
    s = cluster["spark"]
    return int(s["executors"]) * int(s["cores_per_executor"])


def spark_hours(core_seconds: float, cluster: dict) -> float:
    return core_seconds / (spark_cores(cluster) * float(cluster["spark"]["efficiency"])) / HOUR


def gpu_hours(core_seconds: float, cluster: dict) -> float:
    """Wall hours on all the GPUs together."""
    g = cluster["gpu"]
    return core_seconds / float(g["core_equivalent"]) / int(g["count"]) / HOUR


def stage_row(name: str, point: dict, b: float, n: float, runs_on: str, cluster: dict, per_queries: int = 0,
              queries: float = 0.0) -> dict:
    """One stage at the paper's size `n` (products for the index placements, whose `queries` search them)."""
    row = {"stage": name, "paper_size": n, "runs_on": runs_on, "b": b}
    if runs_on in ("shards", "shard_search"):
        shards = int(cluster["spark"]["executors"])
        per_shard = carried(point["size"], point["cpu_seconds"], b, n / shards)
        if runs_on == "shards":
            core_s = per_shard * shards
            hours = per_shard / int(cluster["spark"]["cores_per_executor"]) / HOUR
        else:
            core_s = per_shard * shards * queries / per_queries
            hours = spark_hours(core_s, cluster)
        row.update(core_hours=core_s / HOUR, hours=hours, resources=f"{shards} shards x "
                   f"{cluster['spark']['cores_per_executor']} cores")
        return row
    core_s = carried(point["size"], point["cpu_seconds"], b, n)
    row.update(core_hours=core_s / HOUR, cpu_cluster_hours=spark_hours(core_s, cluster))
    if runs_on == "gpu":
        row.update(hours=gpu_hours(core_s, cluster), gpu_hours=gpu_hours(core_s, cluster) * int(cluster["gpu"]["count"]),
                   resources=f"{cluster['gpu']['count']} GPUs")
    elif runs_on == "spark":
        row.update(hours=row["cpu_cluster_hours"], resources=f"{spark_cores(cluster)} cores")
    else:
        raise ValueError(f"runs_on must be spark, gpu, shards or shard_search, got {runs_on!r}")
    return row


def llm_row(pairs: float, llm: dict) -> dict:
    """Escalated pairs as LLM requests: count, tokens, hours at the allowed rate, USD at the price table."""
    calls = pairs * float(llm["escalation_share"])
    prompt = calls * float(llm["prompt_tokens"])
    completion = calls * float(llm["completion_tokens"])
    price = llm["price"]
    usd = (prompt * float(price["input_usd_per_mtok"]) + completion * float(price["output_usd_per_mtok"])) / 1e6
    return {"stage": "LLM tiers", "paper_size": pairs, "calls": calls, "prompt_tokens": prompt,
            "completion_tokens": completion, "hours": calls / float(llm["requests_per_s"]) / HOUR, "usd": usd,
            "usd_batch": usd * (1.0 - float(price.get("batch_discount", 0.0))),
            "resources": f"{llm['requests_per_s']} requests/s"}


def paper_sizes(paper: dict) -> dict:
    """The size of each stage's unit at the paper's scale."""
    return {"log_rows": float(paper["queries"]) * int(paper["channels"]) * int(paper["top_k"]),
            "products": float(paper["products"]), "queries": float(paper["queries"]),
            "graded_pairs": float(paper["graded_examples"]),
            "examples": float(paper["graded_examples"]) * float(paper["epochs"])}


def project(measured: dict, spec: dict) -> list[dict]:
    """Rows of the projection: each measured stage named in `spec['stages']`, then the LLM tiers.

    `measured[stage]`: {"points": [{"size", "seconds", "cpu_seconds"}, ...], "b_cpu": fitted b of CPU seconds}.
    `spec`: {"paper": ..., "cluster": ..., "llm": ..., "stages": {stage: {"size": unit, "runs_on": ...}}}."""
    sizes = paper_sizes(spec["paper"])
    rows = []
    for name, how in spec["stages"].items():
        if name not in measured:
            continue
        m = measured[name]
        largest = max(m["points"], key=lambda p: p["size"])
        rows.append(stage_row(name, largest, m["b_cpu"], sizes[how["size"]], how["runs_on"], spec["cluster"],
                              per_queries=int(m.get("per_queries", 0)), queries=sizes["queries"]))
    rows.append(llm_row(sizes["graded_pairs"], spec["llm"]))
    return rows
