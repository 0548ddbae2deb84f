# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · ingest
# MAGIC Products, queries and human labels from the input folder into bronze Delta tables; bad rows go to `quarantine` with a reason.
# MAGIC
# MAGIC All logic is `jobs/ingest.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

dbutils.widgets.text("input", "", "Input folder (products/queries/labels.parquet; empty: the config's paths)")

# COMMAND ----------

from jobs.ingest import main

input_dir = dbutils.widgets.get("input").strip().rstrip("/")
extra = []
if input_dir:
    for name in ("products", "queries", "labels"):
        extra += ["--set", f"ingest.{name}.path={input_dir}/{name}.parquet"]
exit_code = main(stage_args(*extra))
assert exit_code == 0, f"ingest failed with exit code {exit_code}"
