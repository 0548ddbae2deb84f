"""The spark-submit driver of tests/test_cluster_training.py: trains one spec on the cluster it is submitted to,
with TorchDistributor (`local_mode=False`: one barrier task per rank on the executors) or Horovod on Spark
(`horovod.spark.run`, chosen by training.launchers when a classic SparkContext is active), and writes rank 0's
result.

    spark-submit --master spark://... tests/cluster_train.py <spec.json> <launcher> <result.json>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_file: str, launcher: str, result_file: str) -> int:
    from pyspark.sql import SparkSession

    from training.launchers import launch
    from training.spec import TrainSpec

    spark = SparkSession.builder.appName(f"annomine-train-{launcher}").getOrCreate()
    spec = TrainSpec.from_json(Path(spec_file).read_text())
    kwargs = {"local_mode": False} if launcher == "torch_distributor" else {}
    try:
        result = launch(launcher, spec, num_proc=2, **kwargs)
    finally:
        spark.stop()
    Path(result_file).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
