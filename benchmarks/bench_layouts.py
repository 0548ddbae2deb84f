"""How the two cores are best used, on a warehouse of a CrowdFlower run (its judge, labelled pairs and products).

- `grade`: tier-1 grading (`CrossEncoderModel.ce_proba`, the warehouse's current judge, batches of 64) in one process
  with 2 threads, one with 1 thread, and two processes with 1 thread each grading halves at once.
- `encode`: MiniLM catalog encoding (`TextEncoder`, ONNX Runtime, 64 tokens) of the products table, in one process with
  2 threads and in two processes with 1 thread each on halves.
- `train`: the judge's training loop (1 epoch, batches of 16, the pipeline's settings) with 2 threads and with 1; the
  process's CPU time and the time spent drawing dropout masks.
- `catalog`: a trained two-tower's catalog encoding in Spark (the embedded engine, 4 partitions) and on the driver.

Each setting runs in a fresh process; the settings alternate round by round so the host's drift hits them alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LAYOUTS = {"grade": [("1 process x 2 threads", 2, 1), ("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 1, 2)],
           "encode": [("1 process x 2 threads", 2, 1), ("2 processes x 1 thread", 1, 2)],
           "train": [("2 threads", 2, 1), ("1 thread", 1, 1)],
           "catalog": [("driver", 2, 1), ("spark", 2, 1)]}


def _texts(warehouse: str) -> list[str]:
    from deltalake import DeltaTable

    products = DeltaTable(str(Path(warehouse) / "annomine" / "products")).to_pandas(columns=["product_id", "text"])
    return products.sort_values("product_id")["text"].fillna("").astype(str).tolist()


def _grade(args, part: int, parts: int) -> dict:
    from bench_judge import warehouse_pairs

    from annomine.judges.cross_encoder import CrossEncoderModel
    from annomine.judges.store import resolve_judge

    df = warehouse_pairs(args.warehouse, args.pairs).iloc[part::parts]
    judge = CrossEncoderModel.load(resolve_judge(args.warehouse, None))
    judge.ce_proba(df["query"].tolist()[:16], df["text"].tolist()[:16])  # warm-up
    started = time.perf_counter()
    judge.ce_proba(df["query"].tolist(), df["text"].tolist(), batch_size=64)
    return {"n": len(df), "seconds": time.perf_counter() - started}


def _encode(args, part: int, parts: int) -> dict:
    from annomine.encoders import TextEncoder

    texts = _texts(args.warehouse)[part::parts]
    encoder = TextEncoder("minilm", max_length=64, batch_size=128, threads=args.threads)
    encoder.encode(texts[:64])  # warm-up (and the ONNX export, when not cached)
    started = time.perf_counter()
    encoder.encode(texts)
    return {"n": len(texts), "seconds": time.perf_counter() - started}


def _train(args, part: int, parts: int) -> dict:
    from bench_judge import warehouse_pairs

    import annomine.packed_bert as packed
    from annomine.judges.cross_encoder import CrossEncoderSettings, train_cross_encoder

    drawing = {"seconds": 0.0}
    draw = packed.bernoulli_mask

    def timed_draw(shape, keep):
        started = time.perf_counter()
        mask = draw(shape, keep)
        drawing["seconds"] += time.perf_counter() - started
        return mask

    packed.bernoulli_mask = timed_draw
    df = warehouse_pairs(args.warehouse, args.pairs)
    settings = CrossEncoderSettings(base_model="minilm", max_length=128, max_text_chars=400, epochs=1, batch_size=16,
                                    learning_rate=4e-5, freeze_layers=-1, threads=args.threads)
    before = resource.getrusage(resource.RUSAGE_SELF)
    _, history = train_cross_encoder(df, [1, 2, 3, 4], settings, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"n": len(df), "seconds": history["train_seconds"], "cpu_seconds": cpu, "draw_seconds": drawing["seconds"]}


def _catalog(args, part: int, parts: int) -> dict:
    from annomine.evaluation.catalog import Catalog, EncodeSettings, _encode_in_spark, worker_encoder
    from annomine.spark import get_spark

    texts = _texts(args.warehouse)
    catalog = Catalog([str(i) for i in range(len(texts))], texts)
    settings = EncodeSettings()
    started = time.perf_counter()
    if args.layout == "spark":
        _encode_in_spark(get_spark(), catalog, "folder", args.model, settings)
    else:
        worker_encoder("folder", args.model, settings).encode_items(catalog.texts, batch_size=settings.batch_size)
    return {"n": len(texts), "seconds": time.perf_counter() - started}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = {"grade": _grade, "encode": _encode, "train": _train, "catalog": _catalog}[args.what]
    print(json.dumps(run(args, args.part, args.parts)), flush=True)


def layout_rate(args, label: str, threads: int, parts: int) -> dict:
    """Items per second of one layout: `parts` child processes at once, each on its share."""
    common = [sys.executable, __file__, args.what, "--warehouse", args.warehouse, "--pairs", str(args.pairs),
              "--threads", str(threads), "--parts", str(parts), "--layout", label.split()[0]]
    if args.model:
        common += ["--model", args.model]
    procs = [subprocess.Popen(common + ["--child", "--part", str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(parts)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    rate = sum(o["n"] for o in outs) / max(o["seconds"] for o in outs)
    return {"layout": label, "per_s": round(rate, 1), **{k: round(v, 1) for k, v in outs[0].items() if k != "n"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(LAYOUTS))
    parser.add_argument("--warehouse", required=True, help="a CrowdFlower run's warehouse (Delta tables, judges/)")
    parser.add_argument("--pairs", type=int, default=1500, help="labelled pairs graded or trained on")
    parser.add_argument("--model", help="catalog: a trained two-tower folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.what == "catalog" and not args.model:
        parser.error("catalog needs --model (a trained two-tower folder)")
    for round_ in range(args.repeats):
        for label, threads, parts in LAYOUTS[args.what]:
            print(json.dumps({"round": round_ + 1, **layout_rate(args, label, threads, parts)}), flush=True)


if __name__ == "__main__":
    main()
