# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · curriculum
# MAGIC Per-stage training sets of every model variant: `train_set_<variant>` tables and Parquet shards in the scratch volume.
# MAGIC
# MAGIC All logic is `jobs/curriculum.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from jobs.curriculum import main

exit_code = main(stage_args())
assert exit_code == 0, f"curriculum failed with exit code {exit_code}"
