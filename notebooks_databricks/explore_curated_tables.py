# Databricks notebook source
# MAGIC %md
# MAGIC # annomine · explore the curated tables
# MAGIC Creates the curated `v_*` views of `sql/00_views.sql` in the widgets' `catalog.schema`, then runs the
# MAGIC example queries of `sql/`. Each query is a plain SQL file: paste it into the SQL editor with
# MAGIC `${namespace}` replaced by `catalog.schema`, or schedule it as a SQL task or a dashboard dataset.
# MAGIC A statement whose tables do not exist yet (its stage has not run) is reported, not failed.
# MAGIC docs/tables.md describes every table and view.

# COMMAND ----------

# MAGIC %pip install --quiet -r ../resources/requirements-databricks.txt

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

from annomine.config import load_project_config
from annomine.runtime import job_parser, open_context
from annomine.sql_runner import runner_for, sql_files

SQL_DIR = os.path.join(ANNOMINE_ROOT, "sql")
args = job_parser("explore", "").parse_args(stage_args())
runner = runner_for(open_context(load_project_config(args.conf, args.overrides)))
for result in runner.create_views(SQL_DIR):
    print(f"{result.name}: " + (f"skipped, {result.skipped}" if result.skipped else f"created in {runner.namespace}"))


def show(name: str) -> None:
    """Display one example query of sql/ (or say which stage has to run first)."""
    try:
        display(runner.query(name, SQL_DIR))
    except LookupError as exc:
        print(exc)


for f in sql_files(SQL_DIR):
    if not f.is_views:
        print(f"{f.name}: {f.description}")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Difficulty mix per query segment

# COMMAND ----------

show("difficulty_mix_by_segment")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Grade distribution per channel combination

# COMMAND ----------

show("grade_distribution_by_channels")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Disagreement between judge tiers, and the pairs they disagree on most

# COMMAND ----------

show("tier_disagreement")
show("tier_disagreement_pairs")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Pairs that failed annotation, and the cascade against human labels

# COMMAND ----------

show("failed_annotations")
show("judge_vs_human")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Training-set composition per curriculum stage

# COMMAND ----------

show("training_set_composition")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Channel agreement and quarantined rows

# COMMAND ----------

show("channel_overlap")
show("quarantine_summary")

# COMMAND ----------

# MAGIC %md
# MAGIC ### Your own SQL
# MAGIC `%sql` cells read the widgets as named parameters: `IDENTIFIER(:catalog || '.' || :schema || '.<table>')`.

# COMMAND ----------

# MAGIC %sql
# MAGIC SELECT channels, annotation_status, count(*) AS n_candidates, round(avg(grade), 2) AS mean_grade
# MAGIC FROM IDENTIFIER(:catalog || '.' || :schema || '.v_graded_candidates')
# MAGIC GROUP BY channels, annotation_status
# MAGIC ORDER BY channels, annotation_status
