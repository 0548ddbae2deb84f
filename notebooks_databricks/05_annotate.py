# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · annotate
# MAGIC Grade the mined candidates with the judge cascade (tier 1 cross-encoder, tiers 2-3 OpenAI-compatible LLMs) into `annotations`. The LLM key comes from the environment or the secret scope, never from a widget.
# MAGIC
# MAGIC All logic is `jobs/annotate.py` (the workflow task runs the same file); this notebook only passes
# MAGIC parameters. Widgets: catalog, schema, config file, extra `section.key=value` overrides.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from jobs.annotate import main

exit_code = main(stage_args())
assert exit_code == 0, f"annotate failed with exit code {exit_code}"
