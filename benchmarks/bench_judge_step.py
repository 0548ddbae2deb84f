"""Where a step of the tier-1 judge's training goes: forward, backward, gradient clipping and the optimizer.

The real loop's parts (`cross_encoder._fit`: pairs tokenised once, length-bucketed batches of 16, the packed
forward, the loss, AdamW and its schedule), timed over the first `--steps` batches of an epoch on a warehouse's
human-labelled CrowdFlower pairs, with the judge's AdamW (PyTorch's fused kernel, annomine/optim.py) or AdamW's
per-parameter loop.

    python benchmarks/bench_judge_step.py --warehouse warehouse/crowdflower --steps 40 --optimizer fused
    python benchmarks/bench_judge_step.py --warehouse warehouse/crowdflower --steps 40 --optimizer loop
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import emit  # noqa: E402

GRADES = [1, 2, 3, 4]


def labelled_pairs(warehouse: Path, n: int):
    from deltalake import DeltaTable

    base = warehouse / "annomine"
    labels = DeltaTable(str(base / "human_labels")).to_pandas()
    queries = DeltaTable(str(base / "queries")).to_pandas(columns=["query_id", "query"])
    products = DeltaTable(str(base / "products")).to_pandas(columns=["product_id", "text"])
    return labels.merge(queries, on="query_id").merge(products, on="product_id").head(n)


def training_parts(warehouse: Path, optimizer: str):
    """The model, optimizer, schedule, targets, tokens and settings of the judge's training (conf/crowdflower.yaml)."""
    from annomine.judges import cross_encoder as ce

    settings = ce.CrossEncoderSettings(base_model="minilm", max_length=128, max_text_chars=400, epochs=3, batch_size=16,
                                       learning_rate=4e-5, freeze_layers=-1, threads=2)
    ce._seed(settings)
    tokenizer, bert = ce.build_encoder("minilm")
    model = ce.CrossEncoderModel(tokenizer, bert, GRADES, 128, max_text_chars=400)
    df = ce._training_pairs(labelled_pairs(warehouse, 2766), settings)
    labels, weights = ce._targets(df, GRADES, settings)
    opt, schedule = ce._optimizer(model, settings, 519)
    if optimizer == "loop":  # the judge's optimizer is fused (annomine/optim.py); the per-parameter loop instead
        for group in opt.param_groups:
            group["fused"] = None
    queries, texts = df["query"].tolist(), df["text"].tolist()
    lengths = np.array([len(q) + min(len(t), 400) for q, t in zip(queries, texts)])
    batches = ce._batches(np.random.default_rng(settings.seed), lengths, 16, True)
    return model, opt, schedule, labels, weights, model.tokens(queries, texts), batches, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--optimizer", choices=["loop", "fused"], default="fused")
    args = ap.parse_args()
    import torch

    from annomine.judges import cross_encoder as ce

    model, opt, schedule, labels, weights, tokens, batches, settings = training_parts(Path(args.warehouse), args.optimizer)
    grade_values, parts = torch.tensor([float(g) for g in GRADES]), dict.fromkeys(["forward", "backward", "clip", "optimizer"], 0.0)
    model.bert.train()
    started = time.perf_counter()
    for idx in batches[:args.steps]:
        t0 = time.perf_counter()
        loss = ce._batch_loss(model.logits(tokens.batch(idx)), labels[idx], weights[idx], grade_values, 3.0,
                              settings.ordinal_weight)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in model.bert.parameters() if p.requires_grad], 1.0)
        t3 = time.perf_counter()
        opt.step()
        schedule.step()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            parts[name] += seconds
    steps = min(args.steps, len(batches))
    what = f"tier-1 judge training step, MiniLM 128 tokens, batch 16, AdamW {args.optimizer}, {steps} steps"
    emit(what, round(steps / (time.perf_counter() - started), 2), "steps/s",
         **{f"{name}_ms": round(seconds / steps * 1000, 1) for name, seconds in parts.items()})


if __name__ == "__main__":
    main()
