"""The scale sheet: each stage at three sizes of generated data, its growth fitted, the paper's scale projected.

    python benchmarks/scale.py            # full sizes (31 min on 2 cores at load 10-14, 2026-12-06)
    python benchmarks/scale.py --quick    # smaller sizes, for a check
    python benchmarks/run.py --scale      # the same, and the sheet written into docs/benchmarks.md

Stages and their units (sizes 100x apart, smallest to largest):
- mine (log rows): `bench_mine.mine_annomine` on logs from gen_logs.py (catalog = rows / 10, at least 1,000).
- encode (products): MiniLM catalog encoding at 64 tokens, `TextEncoder` as the product builds it (backend auto).
- grade (pairs): the tier-1 cross-encoder's forward pass (MiniLM + head, 128 tokens, batch 64); the head is not
  trained, which does not change the arithmetic; the stack's bi-encoder feature is not included.
- train (examples): `bench_train.train_annomine`, two-tower MNR on MiniLM, one warm-up step untimed.
- faiss_build (products): HNSW (M 32, efConstruction 80) over synthetic 384-d vectors (`bench_faiss.vectors`).
- faiss_search (products): 1,000 queries, k 10, efSearch 128, against that index.
Each stage runs in its own process (`--stage`); each point records wall and CPU seconds (all threads) and the
load average. cost = a * size^b is fitted to both (benchmarks/projection.py). The LLM prompt's tokens are measured
with SmolLM2's tokenizer on the real prompts of generated pairs. The result goes to benchmarks/scale_sheet.json;
the markdown (`render`) is what run.py --scale puts into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from common import Timer, machine  # noqa: E402
from projection import fit_power, project  # noqa: E402
from scale_render import render  # noqa: E402

SPEC = HERE / "scale_cluster.yaml"
OUT = HERE / "scale_sheet.json"
# stage -> (unit, full sizes, quick sizes)
STAGES = {
    "mine": ("log rows", [10_000, 100_000, 1_000_000], [1_000, 10_000, 100_000]),
    "encode": ("products", [20, 200, 2_000], [5, 50, 500]),
    "grade": ("pairs", [10, 100, 1_000], [3, 30, 300]),
    "train": ("examples", [8, 80, 800], [2, 20, 200]),
    "faiss": ("products", [1_000, 10_000, 100_000], [500, 5_000, 50_000]),
}
# Sizes chosen for ~30 minutes on 2 cores shared with other jobs (load 10-14: this run gets about a third of a core).
TRAIN_BATCH = {"full": 8, "quick": 2}
SEARCH_QUERIES = 1_000


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def point(size: int, t: Timer, load_before: float) -> dict:
    return {"size": size, "seconds": round(t.seconds, 3), "cpu_seconds": round(t.cpu_seconds, 3),
            "load": round(max(load_before, load()), 2)}


def measure_mine(sizes: list[int]) -> dict:
    from bench_mine import mine_annomine
    from annomine.config import ProjectConfig
    from annomine.mining import MiningRules
    from annomine.spark import get_spark

    get_spark(ProjectConfig())
    rules = MiningRules(max_positives=50, max_negatives=50, blocking_max_df=5000)
    points = []
    for i, rows in enumerate([sizes[0], *sizes]):  # the first run (smallest size) warms the engine, untimed
        work = Path(tempfile.mkdtemp(prefix="scale-sheet-mine-"))
        try:
            products = max(1000, rows // 10)
            subprocess.run([sys.executable, str(HERE / "gen_logs.py"), "--rows", str(rows), "--products", str(products),
                            "--out", str(work / "data")], check=True, capture_output=True)
            before = load()
            with Timer() as t:
                mine_annomine(work / "data", work / "out" / "candidates", rules, products)
            if i:
                points.append(point(rows, t, before))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"mine": {"points": points, "what": "mine_candidates, caps 50/50, blocking df cap 5,000, catalog rows/10"}}


def measure_encode(sizes: list[int]) -> dict:
    import random

    from annomine.demo_shop import generate_products
    from annomine.encoders import TextEncoder
    from annomine.text import product_text

    products = generate_products(max(sizes), random.Random(1), seed=1)
    texts = [product_text(p.title, None, p.description) for p in products]
    encoder = TextEncoder("minilm", max_length=64)
    encoder.encode(texts[:64])  # warm-up (ONNX Runtime's first shapes)
    points = []
    for n in sizes:
        before = load()
        with Timer() as t:
            encoder.encode(texts[:n])
        points.append(point(n, t, before))
    return {"encode": {"points": points, "what": f"MiniLM, 64 tokens, batch 128, backend {encoder.backend}"}}


def measure_grade(sizes: list[int]) -> dict:
    from annomine.bert import build_encoder
    from annomine.judges.cross_encoder import CrossEncoderModel
    from bench_annotate import make_pairs

    tokenizer, bert = build_encoder("minilm")
    model = CrossEncoderModel(tokenizer, bert, [1, 2, 3, 4], max_length=128)
    model.bert.eval()
    pairs = make_pairs(max(sizes), 0.0)
    model.ce_proba([q for q, _ in pairs[:16]], [d for _, d in pairs[:16]])  # warm-up
    points = []
    for n in sizes:
        before = load()
        with Timer() as t:
            model.ce_proba([q for q, _ in pairs[:n]], [d for _, d in pairs[:n]], batch_size=64)
        points.append(point(n, t, before))
    return {"grade": {"points": points, "what": "tier-1 cross-encoder forward (MiniLM + head, 128 tokens, batch 64), "
                      "stack not included"}}


def measure_train(sizes: list[int], batch: int) -> dict:
    from bench_train import pairs, train_annomine

    data = pairs(max(sizes) + batch)
    points = []
    for n in sizes:
        timings: dict = {}
        before = load()
        train_annomine(data[: n + batch], batch, steps_warmup=1, timings=timings)
        t = argparse.Namespace(**timings)
        points.append(point(n, t, before))
    return {"train": {"points": points, "what": f"two-tower MNR, MiniLM, batch {batch}, q16/i64 tokens, AdamW"}}


def measure_faiss(sizes: list[int]) -> dict:
    from bench_faiss import build_hnsw, vectors

    build, search = [], []
    for n in sizes:
        items, queries = vectors(n, 384, SEARCH_QUERIES)
        before = load()
        with Timer() as t:
            index = build_hnsw(items)
        build.append(point(n, t, before))
        index.hnsw.efSearch = 128
        before = load()
        with Timer() as t:
            index.search(queries, 10)
        search.append(point(n, t, before))
    return {"faiss_build": {"points": build, "what": "HNSW M 32, efConstruction 80, 384-d clustered vectors"},
            "faiss_search": {"points": search, "per_queries": SEARCH_QUERIES,
                             "what": f"{SEARCH_QUERIES:,} queries, k 10, efSearch 128"}}


def measure_prompt_tokens(n: int = 200) -> dict:
    """Mean prompt tokens of the LLM tier's real prompt (annomine/judges/prompt.py) on generated pairs, counted with
    SmolLM2's tokenizer (chat-template tokens, a few a message, not counted)."""
    import llama_cpp

    from annomine.judges.local_models import resolve_model
    from annomine.judges.prompt import build_messages
    from bench_annotate import make_pairs

    vocab = llama_cpp.Llama(model_path=str(resolve_model("smollm2-135m")), vocab_only=True, verbose=False)
    counts, chars = [], 0
    for q, d in make_pairs(n, 0.0):
        for m in build_messages(q, d, [1, 2, 3, 4]):
            counts.append(len(vocab.tokenize(str(m["content"]).encode(), add_bos=False)))
            chars += len(str(m["content"]))
    return {"pairs": n, "prompt_tokens": round(sum(counts) / n, 1), "chars_per_token": round(chars / sum(counts), 2),
            "tokenizer": "SmolLM2-135M (GGUF vocabulary)"}


def measure(stage: str, sizes: list[int], mode: str) -> dict:
    if stage == "mine":
        return measure_mine(sizes)
    if stage == "encode":
        return measure_encode(sizes)
    if stage == "grade":
        return measure_grade(sizes)
    if stage == "train":
        return measure_train(sizes, TRAIN_BATCH[mode])
    if stage == "faiss":
        return measure_faiss(sizes)
    if stage == "tokens":
        return {"tokens": measure_prompt_tokens()}
    raise ValueError(f"unknown stage {stage!r}")


def with_fits(entry: dict, unit: str) -> dict:
    """The stage's points with throughputs, and cost = a * size^b fitted to wall and to CPU seconds."""
    for p in entry["points"]:
        p["per_s"] = round(p["size"] / p["seconds"], 2)
        p["per_cpu_s"] = round(p["size"] / p["cpu_seconds"], 2)
    sizes = [p["size"] for p in entry["points"]]
    a, b = fit_power(sizes, [p["seconds"] for p in entry["points"]])
    a_cpu, b_cpu = fit_power(sizes, [p["cpu_seconds"] for p in entry["points"]])
    return {**entry, "unit": unit, "a": a, "b": round(b, 3), "a_cpu": a_cpu, "b_cpu": round(b_cpu, 3)}


def run_stage(stage: str, mode: str, timeout: int) -> dict:
    """One stage in its own process; its `SCALE {json}` line, fitted."""
    cmd = [sys.executable, str(HERE / "scale.py"), "--stage", stage] + (["--quick"] if mode == "quick" else [])
    started = time.time()
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout)
    lines = [line[6:] for line in proc.stdout.splitlines() if line.startswith("SCALE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"scale stage {stage} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[scale] {stage}: {time.time() - started:.0f}s", flush=True)
    out = json.loads(lines[-1])
    unit = STAGES[stage][0] if stage in STAGES else ""
    return {name: (with_fits(entry, unit) if "points" in entry else entry) for name, entry in out.items()}


def sheet(mode: str, stages: list[str], partial: Path | None = None, timeout: int = 1800) -> dict:
    """Every stage measured, fitted and projected; each finished stage is also written to `partial` at once."""
    spec = yaml.safe_load(SPEC.read_text())
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured: dict = {}
    for stage in stages:
        measured.update(run_stage(stage, mode, timeout))
        if partial is not None:
            partial.write_text(json.dumps(measured, indent=1) + "\n")
    if "tokens" in measured:
        spec["llm"]["prompt_tokens"] = measured["tokens"]["prompt_tokens"]
        spec["llm"]["prompt_tokens_source"] = f"measured: {measured['tokens']['tokenizer']}, {measured['tokens']['pairs']} pairs"
    stage_data = {k: v for k, v in measured.items() if "points" in v}
    command = "python benchmarks/scale.py" + (" --quick" if mode == "quick" else "")
    return {"command": command, "mode": mode, "started": started, "machine": machine(), "measured": measured,
            "spec": spec, "projection": project(stage_data, spec)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10x smaller sizes")
    ap.add_argument("--stage", help="measure one stage in this process and print it (the driver's worker)")
    ap.add_argument("--stages", nargs="*", default=[*STAGES, "tokens"], help="stages to run (default: all + tokens)")
    ap.add_argument("--json", default=str(OUT), help="where the sheet's JSON goes")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.stage:
        sizes = STAGES[args.stage][2 if args.quick else 1] if args.stage in STAGES else []
        print("SCALE " + json.dumps(measure(args.stage, sizes, mode)), flush=True)
        return 0
    partial = Path(args.json).with_suffix(".partial.json")
    result = sheet(mode, args.stages, partial=partial)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
