"""The scale sheet (benchmarks/scale.py's result) as markdown: measured points, fits, projection, assumptions."""

from __future__ import annotations


def _n(x: float) -> str:
    """A count or a size, readable: 1,200,000,000 -> 1.2e9; below a million with separators."""
    if x >= 1e6:
        return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _h(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:,.1f} min" if hours * 60 >= 1 else f"{hours * 3600:,.1f} s"


def points_table(measured: dict) -> list[str]:
    lines = ["| stage | what | unit | size | wall s | CPU s | per wall s | per CPU s | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in measured.items():
        if "points" not in m:
            continue
        for i, p in enumerate(m["points"]):
            what = m["what"] if i == 0 else ""
            lines.append(f"| {name if i == 0 else ''} | {what} | {m['unit']} | {p['size']:,} | {p['seconds']:,.2f} | "
                         f"{p['cpu_seconds']:,.2f} | {p['per_s']:,.1f} | {p['per_cpu_s']:,.1f} | {p['load']} |")
    return lines


def fits_table(measured: dict) -> list[str]:
    lines = ["| stage | sizes | b (wall) | b (CPU) | cost = a * size^b (CPU s) |", "|---|---|---|---|---|"]
    for name, m in measured.items():
        if "points" not in m:
            continue
        sizes = " / ".join(f"{p['size']:,}" for p in m["points"])
        lines.append(f"| {name} | {sizes} {m['unit']} | {m['b']:.2f} | {m['b_cpu']:.2f} | "
                     f"{m['a_cpu']:.3g} * n^{m['b_cpu']:.2f} |")
    return lines


def projection_table(rows: list[dict]) -> list[str]:
    lines = ["| stage | paper-scale size | runs on | b carried | core-hours (measured CPU) | hours on the cluster | "
             "GPU-hours | hours on the Spark cores instead |", "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for r in rows:
        if r["stage"] == "LLM tiers":
            continue
        total += r["hours"]
        gpu = f"{r['gpu_hours']:,.1f}" if "gpu_hours" in r else "-"
        cpu = _h(r["cpu_cluster_hours"]) if "cpu_cluster_hours" in r and r["runs_on"] == "gpu" else "-"
        lines.append(f"| {r['stage']} | {_n(r['paper_size'])} | {r['resources']} | {max(r['b'], 1.0):.2f} | "
                     f"{_n(r['core_hours'])} | {_h(r['hours'])} | {gpu} | {cpu} |")
    lines.append(f"| **all stages above, one after another** | | | | | **{_h(total)}** | | |")
    return lines


def llm_lines(rows: list[dict], llm: dict) -> list[str]:
    r = next(r for r in rows if r["stage"] == "LLM tiers")
    return ["| LLM calls | prompt tokens | completion tokens | hours at the allowed rate | USD | USD through the batch API |",
            "|---|---|---|---|---|---|",
            f"| {_n(r['calls'])} ({_n(r['paper_size'])} pairs x {llm['escalation_share']}) | {_n(r['prompt_tokens'])} "
            f"({llm['prompt_tokens']} a request) | {_n(r['completion_tokens'])} ({llm['completion_tokens']} a request) | "
            f"{_h(r['hours'])} ({r['hours'] / 24:,.0f} days at {llm['requests_per_s']} requests/s) | "
            f"{r['usd']:,.0f} | {r['usd_batch']:,.0f} |"]


def assumptions(spec: dict) -> list[str]:
    p, c, llm = spec["paper"], spec["cluster"], spec["llm"]
    price = llm["price"]
    return [
        f"- Paper's scale: {p['products']:,} products, {p['graded_examples']:,} graded pairs = training examples, "
        f"{p['epochs']} epoch, {p['queries']:,} queries; log rows = queries x {p['channels']} channels x top "
        f"{p['top_k']} (**ASSUMPTION**: the logged depth).",
        f"- Cluster: {c['spark']['executors']} executors x {c['spark']['cores_per_executor']} cores for the Spark stages "
        f"at **ASSUMED** parallel efficiency {c['spark']['efficiency']}; {c['gpu']['count']} GPUs for encode, grade and "
        f"train, each **ASSUMED** to do the work of {c['gpu']['core_equivalent']} of the measured CPU cores (no GPU was "
        "lent: not measured); the FAISS index in one shard per executor.",
        f"- LLM: escalation share {llm['escalation_share']} ({llm['escalation_share_source']}); prompt tokens "
        f"{llm['prompt_tokens']} a request ({llm.get('prompt_tokens_source', 'stated')}); completion tokens "
        f"{llm['completion_tokens']} ({llm['completion_tokens_source']}); **ASSUMED** endpoint rate "
        f"{llm['requests_per_s']} requests/s; **ASSUMED** price table {price['model']} at {price['input_usd_per_mtok']} / "
        f"{price['output_usd_per_mtok']} USD per million prompt / completion tokens, batch API {price['batch_discount']:.0%} off.",
        "- Each stage is carried from its largest measured point, linearly where the fitted b (CPU) is below 1 "
        "(fixed costs amortised), with its own b above 1; CPU seconds count the work of every thread of the process.",
    ]


START, END = "<!-- scale:start -->", "<!-- scale:end -->"


def write_section(doc_text: str, markdown: str) -> str:
    """`doc_text` with the sheet between the scale markers (appended under a "Scale sheet" heading if absent)."""
    block = f"{START}\n_Generated by `python benchmarks/run.py --scale`; do not edit by hand._\n\n{markdown}\n{END}"
    if START in doc_text:
        head, rest = doc_text.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return doc_text.rstrip() + "\n\n## Scale sheet\n\n" + block + "\n"


def render(result: dict) -> str:
    m = result["measured"]
    loads = [p["load"] for v in m.values() for p in v.get("points", [])]
    head = [f"Command: `{result['command']}` (started {result['started']}); machine: {result['machine']}; "
            f"**loaded: other jobs running**, load average {min(loads)}-{max(loads)} during the points.", ""]
    tok = m.get("tokens")
    tokens = ([f"LLM prompt: {tok['prompt_tokens']} tokens a request (mean over {tok['pairs']} generated pairs, "
               f"{tok['tokenizer']}, {tok['chars_per_token']} characters a token; chat-template tokens not counted)."]
              if tok else [])
    return "\n".join(head + points_table(m) + [""] + fits_table(m) + [""] + tokens + [""]
                     + projection_table(result["projection"]) + [""] + llm_lines(result["projection"], result["spec"]["llm"])
                     + ["", "Assumptions:", ""] + assumptions(result["spec"]))
