# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · mine
# MAGIC Set logic over the channels' results into five difficulty levels: `mined_candidates` and `mined_report`.
# MAGIC
# MAGIC All logic is `jobs/mine.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from jobs.mine import main

exit_code = main(stage_args())
assert exit_code == 0, f"mine failed with exit code {exit_code}"
