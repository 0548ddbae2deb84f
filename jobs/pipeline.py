"""Stage `pipeline`: every stage in order, in one Spark session, skipping the ones that are current.

A stage is current when its config section, the Delta versions of its input tables and the
artefacts it reads (the current judge, trained models, source files) are what they were when it
last finished, and its outputs still exist (`annomine/pipeline_state.py`). `--force` re-runs
everything, `--from STAGE` re-runs from a stage on, `--only` runs a subset.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time

from annomine.config import ConfigError, load_job_config, load_project_config, read_config_document
from annomine.pipeline_state import PipelineState, StageSpec
from annomine.publish import read_pointer
from annomine.runtime import job_parser, open_context, setup_logging
from jobs import stage_files as files

log = logging.getLogger("annomine.pipeline")


# Each stage's tables and files (jobs/stage_files.py); its module and description come from `annomine.stages`.
# A stage's fingerprint covers every table and file it reads, so a change re-runs every stage downstream of it.
STAGES: list[StageSpec] = [
    StageSpec("ingest", [], ["products", "queries", "human_labels"], input_files=files.ingest_sources),
    StageSpec("channels", ["products", "queries"], ["retrieval_logs"]),
    StageSpec("mine", ["retrieval_logs", "products", "queries"], ["mined_candidates"]),
    StageSpec("judge", ["human_labels", "products", "queries"], [], output_files=files.judge_pointer),
    StageSpec("annotate", ["mined_candidates", "products", "queries"], ["annotations"],
              input_files=files.judge_pointer, configured_tables=lambda project, cfg: [cfg.source]),
    StageSpec("curriculum", ["mined_candidates", "annotations", "human_labels", "products", "queries"], [],
              output_files=files.curriculum_outputs),
    StageSpec("train", [], [], input_files=files.train_inputs, output_files=files.train_outputs),
    StageSpec("rank", ["human_labels", "products", "queries", "annotations"], [], input_files=files.rank_inputs,
              output_files=files.rank_outputs),
    StageSpec("evaluate", ["human_labels", "products", "queries"], [], input_files=files.evaluate_inputs),
]


def stage_configs(conf: str, overrides: list[str]) -> dict:
    """Every stage's typed config, loaded before anything runs: a typo in the last section fails at once."""
    return {spec.name: load_job_config(conf, spec.name, importlib.import_module(spec.module).CONFIG_CLASS, overrides)[1]
            for spec in STAGES}


def run_pipeline(conf: str, overrides: list[str], *, force: bool = False, start_from: str | None = None,
                 only: list[str] | None = None) -> dict:
    project = load_project_config(conf, overrides)
    config_doc = read_config_document(conf, overrides)
    names = [s.name for s in STAGES]
    for given in ([start_from] if start_from else []) + list(only or []):
        if given not in names:
            raise ConfigError(f"unknown stage {given!r} (--from/--only); stages: {names}")
    if project.fold != 0:  # its record of what is current is the warehouse's, i.e. fold 0's
        raise ConfigError(f"project.fold {project.fold}: the pipeline runs fold 0; run another fold stage by stage "
                          "(annomine curriculum / train / evaluate --set project.fold=1; lab/lab.mk pools the folds)")
    configs = stage_configs(conf, overrides)
    ctx = open_context(project)
    state = PipelineState(project.warehouse_path / "pipeline_state.json")
    rerun = force
    summary = {}
    results = {}
    for spec in STAGES:
        if only and spec.name not in only:
            continue
        if start_from == spec.name:
            rerun = True
        module = importlib.import_module(spec.module)
        cfg = configs[spec.name]
        current, why = state.is_current(spec, ctx.tables, project, cfg, config_doc)
        if current and not rerun:
            print(f"[pipeline] {spec.name}: skipped, {why}", flush=True)
            summary[spec.name] = "skipped"
            continue
        # Once a stage re-runs, everything after it sees new inputs anyway; fingerprints decide.
        print(f"[pipeline] {spec.name}: running ({why})", flush=True)
        ctx = open_context(project)  # the same session, or a new one if the engine ended an idle session
        started = time.time()
        _before(spec.name, project, configs)
        results[spec.name] = module.run(ctx, cfg)
        seconds = time.time() - started
        state.record(spec, ctx.tables, project, cfg, config_doc, seconds, _outcome(module, results[spec.name]))
        summary[spec.name] = "ran"
        print(f"[pipeline] {spec.name}: done in {seconds:.1f}s", flush=True)
    print_outcome(project, conf, overrides, summary, state.state)
    return results


def _before(stage: str, project, configs: dict) -> None:
    """What the pipeline does before a stage runs: the teacher pilot before annotate (`judge.pilot_in_pipeline`), on
    the cascade annotate will pay for; the closing summary shows its verdict."""
    if stage == "annotate" and configs["judge"].pilot_in_pipeline:
        import dataclasses

        from jobs.judge import pilot_step

        cascade = getattr(configs.get("annotate"), "cascade", None) or configs["judge"].cascade
        pilot_step(project, dataclasses.replace(configs["judge"], cascade=cascade))


def _outcome(module, result) -> str | None:
    """The stage's one-line account of its run (its module's `outcome`), for the closing summary."""
    describe = getattr(module, "outcome", None)
    try:
        return describe(result) if describe else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a summary must never fail a finished stage
        log.warning("%s: no one-line outcome (%s)", module.__name__, exc)
        return None


def print_outcome(project, conf: str, overrides: list[str], ran: dict[str, str] | None = None,
                  state: dict | None = None) -> None:
    """The closing summary (annomine/closing_summary.py), read back from what the stages wrote, also when they
    were skipped: one line per stage, the results table, the LLM step, the report and the final model."""
    from annomine.closing_summary import closing_summary
    from jobs import evaluate

    _, eval_cfg = load_job_config(conf, "evaluate", evaluate.CONFIG_CLASS, overrides)
    report_file = evaluate.report_path(project, eval_cfg)
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    pointer = project.warehouse_path / "models" / "best.json"
    best = read_pointer(pointer) if pointer.is_file() else None
    if state is None:
        state = PipelineState(project.warehouse_path / "pipeline_state.json").state
    lines = closing_summary(project, [s.name for s in STAGES], state, ran or {}, report, report_file, best)
    print("\n".join(lines), flush=True)


CONFIG_CLASS = None  # the pipeline has no section of its own


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = job_parser("annomine pipeline", __doc__)
    parser.add_argument("--only", nargs="*", help="run only these stages")
    parser.add_argument("--from", dest="start_from", help="re-run this stage and every later one")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    run_pipeline(args.conf, args.overrides, force=args.force, start_from=args.start_from, only=args.only)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("annomine pipeline", main))
