# Databricks notebook source
# MAGIC %md
# MAGIC ### annomine notebook setup (`%run ./_common`)
# MAGIC Widgets for where the tables live and which config to use, and `stage_args()`: the same
# MAGIC arguments the workflow's tasks (resources/annomine_workflow.yml) pass to `jobs/<stage>.py`.
# MAGIC No pipeline logic lives in the notebooks; it is all in the `annomine` / `jobs` packages.

# COMMAND ----------

import os
import sys

# The bundle's (or the Git folder's) root: annomine/, jobs/, training/, conf/, sql/.
ANNOMINE_ROOT = os.path.abspath("..")
if ANNOMINE_ROOT not in sys.path:
    sys.path.insert(0, ANNOMINE_ROOT)

dbutils.widgets.text("catalog", "main", "Catalog")
dbutils.widgets.text("schema", "annomine", "Schema")
dbutils.widgets.text("conf", os.path.join(ANNOMINE_ROOT, "conf", "databricks.yaml"), "Config file")
dbutils.widgets.text("overrides", "", "Extra overrides (section.key=value; ...)")


def stage_args(*extra: str) -> list[str]:
    """`--conf` and `--set` arguments of a stage: the namespace from the widgets, the scratch volume
    as project.warehouse, then the free-form overrides (`;`-separated)."""
    catalog = dbutils.widgets.get("catalog").strip()
    schema = dbutils.widgets.get("schema").strip()
    args = ["--conf", dbutils.widgets.get("conf").strip()]
    if catalog:
        args += ["--set", f"project.catalog={catalog}"]
    if schema:
        args += ["--set", f"project.schema={schema}"]
    if catalog and schema:
        args += ["--set", f"project.warehouse=/Volumes/{catalog}/{schema}/scratch"]
    for item in dbutils.widgets.get("overrides").split(";"):
        if item.strip():
            args += ["--set", item.strip()]
    return args + list(extra)
