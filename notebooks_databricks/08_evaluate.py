# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · evaluate
# MAGIC FAISS retrieval + NDCG@10 on the human labels for the trained model and the baselines; report PNGs logged to MLflow.
# MAGIC
# MAGIC All logic is `jobs/evaluate.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from jobs.evaluate import main

exit_code = main(stage_args())
assert exit_code == 0, f"evaluate failed with exit code {exit_code}"
