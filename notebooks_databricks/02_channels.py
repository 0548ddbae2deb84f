# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · channels
# MAGIC The lexical, BM25 and ANN retrieval channels over the catalog: top-K per query into `retrieval_logs` (and `product_embeddings`).
# MAGIC
# MAGIC All logic is `jobs/channels.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from jobs.channels import main

exit_code = main(stage_args())
assert exit_code == 0, f"channels failed with exit code {exit_code}"
