# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · run a stage
# MAGIC Runs the stage chosen in the `stage` widget (or every stage in order: `pipeline`) by calling the `main`
# MAGIC of `jobs/<stage>.py`, the function `annomine <stage>` and the workflow's task run, with the same
# MAGIC arguments as that task (resources/annomine_workflow.yml). The stages come from `annomine/stages.py`.
# MAGIC
# MAGIC Widgets: `catalog`, `schema`, `conf`, `overrides` (extra `section.key=value; ...`), and those only some
# MAGIC stages read: `input` (ingest), `action` (judge), `launcher` and `num_proc` (train). `pipeline` passes
# MAGIC every override to every stage, so it reads `input`, `launcher` and `num_proc` as well.
# MAGIC The LLM key comes from the environment or the secret scope, never from a widget.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from annomine.stages import BY_NAME, STAGES

dbutils.widgets.dropdown("stage", "ingest", [s.name for s in STAGES if s.has_section] + ["pipeline"], "Stage")
dbutils.widgets.text("input", "", "ingest: input folder (products/queries/labels.parquet; empty: the config's paths)")
dbutils.widgets.dropdown("action", "train", ["train", "calibrate", "eval"], "judge: action")
dbutils.widgets.dropdown("launcher", "torch_distributor", ["torch_distributor", "torchrun", "inprocess"], "train: launcher")
dbutils.widgets.text("num_proc", "", "train: processes (empty: one per GPU, else 1)")

# COMMAND ----------

import importlib

stage = dbutils.widgets.get("stage")
extra = [dbutils.widgets.get("action")] if stage == "judge" else []
input_dir = dbutils.widgets.get("input").strip().rstrip("/")
if stage in ("ingest", "pipeline") and input_dir:
    for name in ("products", "queries", "labels"):
        extra += ["--set", f"ingest.{name}.path={input_dir}/{name}.parquet"]
if stage in ("train", "pipeline"):
    num_proc = dbutils.widgets.get("num_proc").strip()
    if not num_proc:
        import torch

        num_proc = str(max(1, torch.cuda.device_count()))
    extra += ["--set", f"train.launcher={dbutils.widgets.get('launcher')}", "--set", f"train.num_proc={num_proc}"]

main = importlib.import_module(BY_NAME[stage].module).main
exit_code = main(stage_args(*extra))
assert exit_code == 0, f"{stage} failed with exit code {exit_code}"
