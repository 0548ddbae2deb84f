"""Stage skipping: a stage re-runs only when its config, input tables or input files changed."""

from pathlib import Path

from annomine.pipeline_state import PipelineState
from jobs import pipeline
from tests.conftest import write_tsv


def _conf(tmp_path: Path, project) -> Path:
    products = write_tsv(tmp_path / "in" / "products.tsv", ["product_id", "title", "description"],
                         [["p1", "Red Pillow", ""], ["p2", "Blue Mug", "ceramic"]])
    queries = write_tsv(tmp_path / "in" / "queries.tsv", ["query_id", "query"], [["q1", "pillow"]])
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"project: {{warehouse: '{project.warehouse}', schema: {project.schema}}}\n"
        f"ingest: {{products: {{path: '{products}'}}, queries: {{path: '{queries}'}}}}\n"
    )
    return conf


def test_ingest_is_skipped_when_current_and_rerun_when_its_input_changes(tmp_path, project, spark, capsys):
    conf = _conf(tmp_path, project)
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: running (never ran)" in capsys.readouterr().out

    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: skipped, current" in capsys.readouterr().out

    with open(tmp_path / "in" / "products.tsv", "a", encoding="utf-8") as fh:
        fh.write("p3\tGreen Lamp\t\n")
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    out = capsys.readouterr().out
    assert "ingest: running (inputs changed" in out and "products.tsv" in out

    pipeline.run_pipeline(str(conf), ["ingest.queries_origin=log"], only=["ingest"])
    assert "ingest: running (inputs changed: config)" in capsys.readouterr().out

    pipeline.run_pipeline(str(conf), ["ingest.queries_origin=log"], only=["ingest"], force=True)
    assert "ingest: running" in capsys.readouterr().out
    state = PipelineState(project.warehouse_path / "pipeline_state.json")
    assert state.state["ingest"]["outputs"]["products"] >= 1


def test_a_missing_output_makes_a_stage_run_again(tmp_path, project, spark, capsys):
    import shutil

    from annomine.tables import TableStore

    conf = _conf(tmp_path, project)
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    shutil.rmtree(TableStore(spark, project).location("products"))
    capsys.readouterr()
    pipeline.run_pipeline(str(conf), [], only=["ingest"])
    assert "ingest: running (output table products is missing)" in capsys.readouterr().out
