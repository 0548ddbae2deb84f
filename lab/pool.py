"""Pooled test reports: both folds of the held-out queries, then every rotation's pooled folds, as one report.

    python -m lab.pool --conf lab/conf/crowdflower.yaml                              # folds 0 and 1
    python -m lab.pool --conf lab/conf/crowdflower.yaml --set project.rotation=1     # a rotation's folds
    python -m lab.pool --conf lab/conf/crowdflower.yaml --rotations                  # every rotation's pooled folds

Folds (annomine/splits.py, `project.fold`): the dev and test halves swap roles, so pooling both folds' test
reports (`annomine evaluate --set project.fold=F`) reports every held-out query once, each by a model that was
selected on the other half (lab/folds.py): <warehouse>/evaluation/report_test_folds.json (+ .md, PNG plots).
Rotations (`project.rotation`) hold out other blocks of the open labelled queries; `--rotations` pools each
rotation's pooled folds into <base warehouse>/evaluation/report_test_rotations.json. Reads the `evaluate`
section (bootstrap, confidence, mlflow); ranks nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from annomine.config import load_job_config
from annomine.evaluation import report as report_lib
from annomine.runtime import job_parser, setup_logging
from annomine.splits import FOLDS, ROTATIONS
from jobs.evaluate import EvaluateConfig, report_path
from lab import folds


def pool_folds(project, cfg: EvaluateConfig) -> tuple[dict, Path]:
    """Pool each fold's test report (at its default place) into <warehouse>/evaluation/report_test_folds.json."""
    reports = {}
    for fold in FOLDS:
        path = report_path(dataclasses.replace(project, fold=fold), dataclasses.replace(cfg, split="test", out=None))
        if path.is_file():
            try:
                reports[fold] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise folds.FoldReportError(f"{path}: not a readable report: {exc}") from exc
    report = folds.pool(reports, cfg.bootstrap_resamples, cfg.confidence, project.seed, also_against=tuple(cfg.compare_with))
    out = project.warehouse_path / "evaluation" / "report_test_folds.json"
    _write_pooled(report, out, project, cfg, "evaluate-folds")
    print(f"evaluate: pooled the test reports of folds {sorted(reports)} ({report['inputs']['n_queries_evaluated']} "
          f"queries): {out} (+ .md and PNG plots)")
    return report, out


def pool_rotations(project, cfg: EvaluateConfig) -> tuple[dict, Path]:
    """Pool every rotation's pooled-folds test report (`python -m lab.pool` in each) into
    <base warehouse>/evaluation/report_test_rotations.json: each open labelled query held out in some rotation,
    reported once. Rotations without that report are left out and named."""
    reports, missing = {}, []
    for rotation in ROTATIONS:
        path = dataclasses.replace(project, rotation=rotation).warehouse_path / "evaluation" / "report_test_folds.json"
        if not path.is_file():
            missing.append(rotation)
            continue
        try:
            reports[rotation] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise folds.FoldReportError(f"{path}: not a readable report: {exc}") from exc
    report = folds.pool_rotations(reports, cfg.bootstrap_resamples, cfg.confidence, project.seed,
                                      also_against=tuple(cfg.compare_with), missing=missing)
    out = project.base_warehouse_path / "evaluation" / "report_test_rotations.json"
    _write_pooled(report, out, project, cfg, "evaluate-rotations")
    print(f"evaluate: pooled the folds of rotations {sorted(reports)} ({report['inputs']['n_queries_evaluated']} "
          f"queries{'; no pooled folds yet for rotation(s) ' + str(missing) if missing else ''}): {out}")
    return report, out


def _write_pooled(report: dict, out: Path, project, cfg: EvaluateConfig, run_name: str) -> None:
    report_lib.write_json(report, out)
    plot_files = report_lib.plot_paths(out)
    plots = [report_lib.plot_metrics(report, plot_files["metrics"]), report_lib.plot_grades(report, plot_files["grades"])]
    md = out.with_suffix(".md")
    md.write_text(report_lib.markdown(report))
    if cfg.mlflow:
        report["mlflow_run_id"] = report_lib.log_to_mlflow(report, [out, md, *plots], project.tracking_uri,
                                                           project.mlflow_experiment, run_name=run_name)
        report_lib.write_json(report, out)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = job_parser("python -m lab.pool", __doc__)
    parser.add_argument("--rotations", action="store_true",
                        help="pool every rotation's report_test_folds.json into the base warehouse's report_test_rotations.json")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    project, cfg = load_job_config(args.conf, "evaluate", EvaluateConfig, args.overrides)
    cfg.mlflow = cfg.mlflow and not args.no_mlflow
    report, out = pool_rotations(project, cfg) if args.rotations else pool_folds(project, cfg)
    print("\n" + "\n".join(report_lib.summary(report, out)), flush=True)
    return 0


if __name__ == "__main__":
    from annomine.cli import guarded

    sys.exit(guarded("python -m lab.pool", main))
