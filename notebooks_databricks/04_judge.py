# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · judge
# MAGIC Train the tier-1 cross-encoder judge on the human labels, calibrate every tier, or evaluate the cascade.
# MAGIC
# MAGIC All logic is `jobs/judge.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

dbutils.widgets.dropdown("action", "train", ["train", "calibrate", "eval"], "Action")

# COMMAND ----------

from jobs.judge import main

exit_code = main(stage_args(dbutils.widgets.get("action")))
assert exit_code == 0, f"judge failed with exit code {exit_code}"
