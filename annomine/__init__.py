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



def _openmp_waits() -> None:
    """Idle OpenMP threads spin briefly, then sleep (`OMP_WAIT_POLICY=PASSIVE` with `GOMP_SPINCOUNT=3000`), unless
    the environment sets a wait policy of its own.

    torch (and FAISS, LightGBM) run their CPU kernels on OpenMP, which reads these when the library loads, so they
    are set here, before any of them is imported. With GNU OpenMP's default a thread spins about 300,000 times after
    each parallel region; on cores shared with other processes (Spark workers, a second job) the spinning thread
    takes the core from the one with work: on 2 loaded cores the tier-1 judge graded about half as fast with
    2 threads as with PASSIVE (benchmarks/bench_threads.py). Sleeping at once costs a wake-up at every region
    instead: the judge's training step, thousands of small regions, ran 1.08x faster with 3,000 spins first on idle
    cores, grading as fast as PASSIVE on loaded ones, and a 2-thread LightGBM fit 2.7x faster (docs/benchmarks.md).
    Results do not change.
    """
    import os

    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")


_prefer_spark_connect()
_openmp_waits()
