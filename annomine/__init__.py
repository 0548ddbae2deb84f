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


_prefer_spark_connect()
