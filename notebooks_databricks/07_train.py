# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · train
# MAGIC Train the two-tower retriever through the curriculum, tracked in MLflow. On a GPU cluster the default launcher is Spark's TorchDistributor, one process per GPU.
# MAGIC
# MAGIC All logic is `jobs/train.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

dbutils.widgets.dropdown("launcher", "torch_distributor", ["torch_distributor", "torchrun", "inprocess"], "Launcher")
dbutils.widgets.text("num_proc", "", "Processes (empty: one per GPU, else 1)")

# COMMAND ----------

from jobs.train import main

num_proc = dbutils.widgets.get("num_proc").strip()
if not num_proc:
    import torch

    num_proc = str(max(1, torch.cuda.device_count()))
extra = ["--set", f"train.launcher={dbutils.widgets.get('launcher')}", "--set", f"train.num_proc={num_proc}"]
exit_code = main(stage_args(*extra))
assert exit_code == 0, f"train failed with exit code {exit_code}"
