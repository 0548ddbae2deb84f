"""Where a two-tower training step goes: PyTorch's profiler over the steps of `bench_train.py`'s loop.

    python benchmarks/bench_train_profile.py --steps 2
    python benchmarks/bench_train_profile.py --dropout-share 8

The same model, loss, optimizer (annomine/optim.py) and demo-shop pairs as `bench_train.py` (batch 64, MiniLM,
query 16 / item 64 tokens, the packed forward); after two warm-up steps, `--steps` steps are profiled and each
operator's share of the CPU time is printed, largest first, with the wall seconds of a step's parts.
`--dropout-share N`: instead, N rounds of one step with the model's dropout and one with every dropout at 0,
alternating; the medians tell what dropout (its masks, and attention's kernel with dropout) costs a step.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_train import pairs


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from annomine.optim import adamw
    from annomine.two_tower import TwoTower
    from training.losses import MNRLoss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--dropout-share", type=int, default=0, metavar="N", help="time N rounds with and without dropout")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = pairs(args.batch_size * (args.steps + 2))
    batches = [data[i:i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    model = TwoTower.from_base("minilm", shared=True, query_max_len=16, item_max_len=64).train()
    loss_fn = MNRLoss(scale=20.0, margin_delta=None)
    opt = adamw([{"params": list(model.parameters())}], lr=2e-5)
    parts = {"tokenise": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(batch, timed: bool) -> None:
        marks = [time.perf_counter()]
        tokens = model.tokenize([b[0] for b in batch], "query"), model.tokenize([b[1] for b in batch], "item")
        marks.append(time.perf_counter())
        loss = loss_fn(*model(*tokens))
        marks.append(time.perf_counter())
        opt.zero_grad()
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        if timed:
            for name, start, end in zip(parts, marks, marks[1:]):
                parts[name] += end - start

    for batch in batches[:2]:
        step(batch, False)
    if args.dropout_share:
        return dropout_share(model, lambda i: step(batches[2 + i % args.steps], False), args.dropout_share)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            step(batch, True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("a step's parts (wall ms):", {k: round(v / args.steps * 1000, 1) for k, v in parts.items()})
    for e in events[:args.top]:
        print(f"{e.key:<40} {100 * e.self_cpu_time_total / total:5.1f}%  {e.count // args.steps:>5} calls a step")


def dropout_share(model, step, rounds: int) -> None:
    """Median wall ms of a step with the model's dropout and with every dropout at 0, in alternating rounds."""
    import statistics

    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    seconds: dict[str, list[float]] = {"with dropout": [], "without": []}
    for i in range(rounds):
        for name in seconds:
            for module, p in dropouts:
                module.p = p if name == "with dropout" else 0.0
            start = time.perf_counter()
            step(i)
            seconds[name].append(time.perf_counter() - start)
    with_, without = (statistics.median(v) * 1000 for v in seconds.values())
    print(f"a step with dropout {with_:.0f} ms, without {without:.0f} ms: dropout is {1 - without / with_:.0%} of it "
          f"({len(dropouts)} dropout modules, medians of {rounds} alternating rounds)")


if __name__ == "__main__":
    main()
