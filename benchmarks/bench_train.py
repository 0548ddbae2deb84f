"""Two-tower training throughput vs sentence-transformers' MultipleNegativesRankingLoss.

Same model (all-MiniLM-L6-v2), same (query, product) pairs, same batch size and threads, the same fused AdamW
(annomine's, and the default of sentence-transformers' trainers), measured
in one run, so the ratio is meaningful even when absolute speed moves with the machine's load. The three
trainings (packed, padded, sentence-transformers) run in turn `--repeats` times, and the figures are the
medians, so a change of the machine's speed within the run hits every side alike.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from annomine.demo_shop import generate_products
from annomine.encoders import minilm_path
from annomine.text import product_text
from common import Timer, emit


def pairs(n: int) -> list[tuple[str, str]]:
    products = generate_products(n, random.Random(3), seed=3)
    return [(f"{p.brand.lower()} {p.ptype}", product_text(p.title, None, p.description)) for p in products]


def examples_per_second(batches, step, steps_warmup: int, timings: dict | None = None) -> float:
    """Run `step` over the batches; examples/s after the warm-up steps (`timings` gets the timed steps' wall and CPU
    seconds, and `losses` the value `step` returned for each batch)."""
    losses = [step(b) for b in batches[:steps_warmup]]
    with Timer() as t:
        losses += [step(b) for b in batches[steps_warmup:]]
    if timings is not None:
        timings.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, losses=losses)
    return sum(len(b) for b in batches[steps_warmup:]) / t.seconds


def train_annomine(data, batch_size: int, steps_warmup: int = 1, timings: dict | None = None,
                   packed: bool = True) -> float:
    """annomine's two-tower MNR steps; `packed`: BERT's dense layers on real tokens only (annomine/packed_bert.py),
    else the model's own padded forward."""
    from annomine.optim import adamw
    from annomine.two_tower import TwoTower
    from training.losses import MNRLoss

    torch.manual_seed(0)
    model = TwoTower.from_base("minilm", shared=True, query_max_len=16, item_max_len=64).train()
    model.packed_training = packed
    loss_fn = MNRLoss(scale=20.0, margin_delta=None)
    opt = adamw([{"params": list(model.parameters())}], lr=2e-5)  # training/runner.py's optimizer
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]

    def step(batch):
        q, d = model(model.tokenize([b[0] for b in batch], "query"), model.tokenize([b[1] for b in batch], "item"))
        loss = loss_fn(q, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return examples_per_second(batches, step, steps_warmup, timings)


def train_sentence_transformers(data, batch_size: int, steps_warmup: int = 1) -> float:
    from sentence_transformers import SentenceTransformer, losses

    torch.manual_seed(0)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = 64
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    # fused: the optimizer of sentence-transformers' trainers (Hugging Face's `adamw_torch_fused` default)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    model.train()
    batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]

    def step(batch):
        q = model.tokenize([b[0] for b in batch])
        d = model.tokenize([b[1] for b in batch])
        loss = loss_fn([q, d], None)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return examples_per_second(batches, step, steps_warmup)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three trainings; medians reported")
    args = parser.parse_args()
    data = pairs(args.examples + args.batch_size)
    packed_run, padded_run = {}, {}
    rates = {"ours": [], "padded": [], "st": []}
    for r in range(args.repeats):
        rates["ours"].append(train_annomine(data, args.batch_size, timings=packed_run if r == 0 else None))
        rates["padded"].append(train_annomine(data, args.batch_size, timings=padded_run if r == 0 else None,
                                              packed=False))
        rates["st"].append(train_sentence_transformers(data, args.batch_size))
    ours, padded, st = (statistics.median(rates[k]) for k in ("ours", "padded", "st"))
    print({k: [round(v, 1) for v in vs] for k, vs in rates.items()}, flush=True)
    threads = torch.get_num_threads()
    emit(f"two-tower MNR training, MiniLM, batch {args.batch_size}, q16/i64 tokens, {threads} threads", round(ours, 1), "examples/s")
    emit(f"the same with BERT's own padded forward, {threads} threads", round(padded, 1), "examples/s")
    emit("two-tower training speed, real tokens only / padded forward (same run)", round(ours / padded, 2), "x")
    emit("two-tower training, real tokens only vs padded forward: max |loss difference| over the steps",
         float(f"{max(abs(a - b) for a, b in zip(packed_run['losses'], padded_run['losses'])):.3g}"), "")
    emit(f"sentence-transformers MNRL training, MiniLM, batch {args.batch_size}, 64 tokens, {threads} threads", round(st, 1), "examples/s")
    emit("two-tower / sentence-transformers training speed ratio (same run)", round(ours / st, 2), "x")


if __name__ == "__main__":
    main()
