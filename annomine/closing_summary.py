"""The pipeline's closing summary: one screen, read back from what the stages wrote (also when they were skipped).

- one line per stage: what it produced and how long it took (`pipeline_state.json`);
- the results table of the evaluation report: every model's NDCG@10 with its CI, its paired difference with
  zero-shot MiniLM over the same queries and the lowest-grade share (left out, with a line saying so, when it
  is the same for every model); one sentence each on whether the pipeline's retriever and the registered list
  beat the best baseline a team has without training (BM25, MiniLM, their fusion); the judge's order against
  MiniLM's (the teacher check);
- the LLM step: the teacher pilot's verdict (or why it did not run), and per LLM tier the requests,
  response-cache hits, tokens and money of judge calibrate and of the last annotate run (`runs/*_summary.json`);
- where the report, the registered model and the pipeline's retriever are.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from annomine.evaluation.metrics import bootstrap_ci
from annomine.evaluation.report import registration_line
from annomine.judges import lines as judge_lines
from annomine.run_summary import read_summary, summary_path

REFERENCE = "minilm"  # every model's paired difference is taken against zero-shot MiniLM


def stage_lines(state: dict, stages: list[str], ran: dict[str, str]) -> list[str]:
    """'  judge       312s  tier 1 ...: dev exact agreement 0.71, QWK 0.80' per stage; `ran`: stage -> 'ran'/'skipped'."""
    out = []
    for name in stages:
        rec = state.get(name)
        if not rec:
            out.append(f"  {name:<11} {'-':>6}  not run")
            continue
        took = f"{rec.get('seconds', 0):.0f}s"
        note = "" if ran.get(name) != "skipped" else " (current, not re-run)"
        out.append(f"  {name:<11} {took:>6}  {rec.get('outcome') or 'done'}{note}")
    return out


def _fmt(mean, low, high, signed: bool = False) -> str:
    if mean is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def paired_with(per_query: pd.DataFrame, model: str, reference: str, metric: str, bootstrap: dict) -> dict | None:
    """The mean per-query difference model - reference on `metric` with its bootstrap CI, over the queries both scored."""
    wide = per_query.pivot_table(index="query_id", columns="model", values=metric, aggfunc="first")
    if model not in wide or reference not in wide:
        return None
    diff = (wide[model] - wide[reference]).dropna()
    if diff.empty:
        return None
    return bootstrap_ci(diff.tolist(), bootstrap.get("resamples", 1000), bootstrap.get("confidence", 0.95),
                        bootstrap.get("seed", 13)).as_dict()


def _lowest_informative(models: list[dict]) -> bool:
    """The lowest-grade share says something only when the models differ on it."""
    values = {round(m["metrics"]["all"]["lowest_share@10"].get("mean") or 0.0, 4) for m in models}
    return len(values) > 1


def results_lines(report: dict, final_label: str | None) -> list[str]:
    """The results table: NDCG@10 [CI], paired difference with MiniLM [CI] and, where it varies, the lowest-grade share."""
    models = report.get("models") or []
    per_query = pd.DataFrame(report.get("per_query") or [])
    boot = report.get("bootstrap") or {}
    conf = int(round(boot.get("confidence", 0.95) * 100))
    lowest = _lowest_informative(models) if models else False
    head = f"  {'model':<16} {'NDCG@10 [' + str(conf) + '% CI]':<24} {'vs minilm, paired':<26}"
    out = [head + (" lowest-grade share@10" if lowest else "")]
    for m in models:
        label, all_ = m["label"], m["metrics"]["all"]
        nd = all_["ndcg@10"]
        cell = "reference"
        if label != REFERENCE and not per_query.empty:
            d = paired_with(per_query, label, REFERENCE, "ndcg@10", boot)
            cell = _fmt(d["mean"], d["ci_low"], d["ci_high"], signed=True) if d else "n/a (no minilm)"
        role = _role(m, final_label, (report.get("registration") or {}).get("model"))
        row = f"  {label:<16} {_fmt(nd.get('mean'), nd.get('ci_low'), nd.get('ci_high')):<24} {cell:<26}"
        if lowest:
            row += f" {100 * (all_['lowest_share@10'].get('mean') or 0):5.1f}%"
        out.append(row + (f"  {role}" if role else ""))
    if models and not lowest:
        share = models[0]["metrics"]["all"]["lowest_share@10"].get("mean") or 0.0
        out.append(f"  (lowest-grade share@10 left out: {100 * share:.1f}% for every model, so it separates none)")
    return out


def _role(model: dict, final_label: str | None, registered: str | None) -> str:
    spec = model.get("spec") or {}
    roles = ["the pipeline's retriever"] if model["label"] == final_label else []
    if model["label"] == registered:
        roles.append("registered (best on dev)")
    if spec.get("baseline"):
        roles.append("free baseline")
    return ("<- " if roles and not spec.get("baseline") else "") + ", ".join(roles)


def verdict_line(report: dict, final_label: str | None) -> str | None:
    """Whether a list of the pipeline's (its retriever, the registered list) beats the best model a team has without
    training, paired over the same queries."""
    models = {m["label"]: m for m in report.get("models") or []}
    free = [label for label, m in models.items() if (m.get("spec") or {}).get("baseline")]
    per_query = pd.DataFrame(report.get("per_query") or [])
    if final_label not in models or not free or per_query.empty:
        return None
    best = max(free, key=lambda label: models[label]["metrics"]["all"]["ndcg@10"].get("mean") or 0.0)
    d = paired_with(per_query, final_label, best, "ndcg@10", report.get("bootstrap") or {})
    if d is None:
        return None
    diff = _fmt(d["mean"], d["ci_low"], d["ci_high"], signed=True)
    if d["ci_low"] > 0:
        outcome = "beats"
    elif d["ci_high"] < 0:
        outcome = "loses to"
    else:
        outcome = "is not told apart from"
    return (f"{final_label} {outcome} the best baseline without training ({best}): NDCG@10 {diff}, paired over "
            f"{d['n']} {report.get('split')} queries" + ("" if outcome != "is not told apart from" else
                                                           " (the CI includes 0)"))


def teacher_line(teacher: dict | None) -> str | None:
    """The judge's order of each dev query's labelled products against zero-shot MiniLM's: how good a teacher the
    judge is, and what its rerank (`best+ce`) and the ranker's cross-encoder features can be worth."""
    r = (teacher or {}).get("dev")
    if not r or (r.get("diff") or {}).get("mean") is None:
        return None
    d = r["diff"]
    return (f"the judge as a teacher ({r['n_queries']} dev queries): NDCG@10 of its order "
            f"{r['judge_ndcg@10']['mean']:.3f} vs {r['baseline']} {r['baseline_ndcg@10']['mean']:.3f}, paired "
            f"{_fmt(d['mean'], d['ci_low'], d['ci_high'], signed=True)} (what best+ce reranks with)")


def llm_lines(project) -> list[str]:
    """The teacher pilot's verdict (or why it did not run) and, per LLM tier, the last annotate run's spending."""
    pilot = read_summary(project, "judge_pilot")
    if pilot and "not_run" in pilot:
        out = [f"teacher pilot: not run: {pilot['not_run']}"]
    else:
        out = [judge_lines.pilot_line(pilot) if pilot else
               "teacher pilot: not run in this warehouse (the pipeline runs it before annotate unless "
               "`judge.pilot_in_pipeline` is off; `annomine judge pilot` runs it alone)"]
    calibrated = read_summary(project, "judge_calibrate")
    if calibrated:
        out.append(f"judge calibrate: {judge_lines.combiner_outcome(calibrated)}")
        out += [f"  {line}" for line in judge_lines.tier_usage_lines((calibrated.get("llm_cache") or {}).get("cost"))]
    annotated = read_summary(project, "annotate")
    if annotated is None:
        return out + ["annotate: no summary (it has not run in this warehouse)"]
    usage = judge_lines.tier_usage_lines(annotated.get("cost"))
    out.append(judge_lines.annotate_line(annotated))
    return out + ([f"  {line}" for line in usage] or ["  no LLM tier configured: tier 1 graded every pair"])


def closing_summary(project, stages: list[str], state: dict, ran: dict[str, str], report: dict | None,
                    report_file: Path, best: dict | None) -> list[str]:
    """The whole closing screen."""
    total = sum((state.get(s) or {}).get("seconds", 0) for s in stages)
    took = f"{total:.0f} s" if total < 90 else f"{total / 60:.0f} min"
    out = ["", f"== annomine pipeline: {len(stages)} stages, {took} of stage time =="]
    out += stage_lines(state, stages, ran)
    final_label = (best or {}).get("variant")
    if report:
        inputs = report.get("inputs", {})
        role = str(report.get("split_role") or "").split(" (")[0].split(",")[0]
        out += ["", f"Results on {inputs.get('n_queries_evaluated')} {report.get('split')} queries"
                    + (f" ({role})" if role else "") + ":"]
        out += results_lines(report, final_label)
        registered = (report.get("registration") or {}).get("model")
        for label in dict.fromkeys([final_label, registered]):  # the retriever, then the registered list
            verdict = verdict_line(report, label)
            if verdict:
                out.append(verdict)
        teacher = teacher_line(report.get("teacher"))
        if teacher:
            out.append(teacher)
    out += ["", "LLM step:", *(f"  {line}" for line in llm_lines(project))]
    out += ["", f"report: {report_file.with_suffix('.md')} (JSON beside it; plot "
                f"{report_file.with_name(report_file.stem + '_metrics.png').name})" if report else "report: not written yet"]
    registered = registration_line((report or {}).get("registration"))
    if registered:
        out.append(registered)
    if best:
        out.append(f"pipeline's retriever ({best.get('variant')}): {best.get('path')}"
                   + (f", MLflow {best['model_uri']}" if best.get("model_uri") else "")
                   + "; `annomine evaluate --model best` resolves it")
    out.append(f"stage summaries: {summary_path(project, 'STAGE').parent}/")
    return out
