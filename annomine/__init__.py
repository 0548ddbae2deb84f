"""annomine: mine retrieval-channel disagreement, grade it with an LLM cascade, train a two-tower retriever.

The `annomine` package holds what every stage shares: configuration (`config`), the Spark
session factory (`spark`), logical tables and their schemas (`schemas`, `tables`), and the
checks that send bad rows to the `quarantine` table (`ingestion`, `log_validation`, `mining`).
Stage logic lives in `jobs/`, `spark_udfs/` and `training/`.
"""

__version__ = "0.1.0"


def _prefer_spark_connect() -> None:
    """Make module-level `pandas_udf`s Spark Connect UDFs unless a classic driver runs this process.

    PySpark picks the UDF flavour (classic or Connect) when a UDF is *defined*, so the mode must
    be known at import time. spark-submit (PYSPARK_GATEWAY_PORT) and Databricks clusters
    (DATABRICKS_RUNTIME_VERSION) are classic; `ANNOMINE_SPARK_MODE=classic` forces classic
    (e.g. a local classic session in tests); everything else uses Spark Connect (Sail embedded,
    SPARK_REMOTE, Databricks Connect).
    """
    import os

    # `spark-submit --remote sc://...` (or SPARK_REMOTE) drives a Spark Connect server although a
    # Py4J gateway exists: Connect wins.
    remote = "SPARK_REMOTE" in os.environ or any(
        '"spark.remote"' in os.environ.get(f"PYSPARK_REMOTE_INIT_CONF_{i}", "")
        for i in range(int(os.environ.get("PYSPARK_REMOTE_INIT_CONF_LEN", "0") or 0))
    )
    classic = not remote and (
        os.environ.get("ANNOMINE_SPARK_MODE") == "classic"
        or "PYSPARK_GATEWAY_PORT" in os.environ
        or "DATABRICKS_RUNTIME_VERSION" in os.environ
    )
    if not classic:
        os.environ.setdefault("SPARK_CONNECT_MODE_ENABLED", "1")



def _passive_openmp_waits() -> None:
    """Idle OpenMP threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE` unless already set).

    torch (and FAISS, LightGBM) run their CPU kernels on OpenMP, which reads the policy when the library loads,
    so it is set here, before any of them is imported. With GNU OpenMP's default a thread spins after each
    parallel region; on cores shared with other processes (Spark workers, a second job) the spinning thread
    takes the core from the one with work: on 2 loaded cores the tier-1 judge graded about half as fast with
    2 threads as with PASSIVE (benchmarks/bench_threads.py, docs/benchmarks.md). Results do not change.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_prefer_spark_connect()
_passive_openmp_waits()
