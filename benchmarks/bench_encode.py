"""MiniLM encoding throughput, torch vs ONNX Runtime on the same texts, and how close their vectors are.

Catalog side: product texts truncated at 64 tokens; query side: demo-shop queries at 16 tokens. Each
side is timed back to back, alternating backends for `--repeats` rounds (best round kept), so both
see the same machine load. Figures per side: products/s (or queries/s) of `TextEncoder(backend="torch")`
and of `TextEncoder(backend="onnx")` (both length-sorted batches), the ratio ONNX/torch, the ratio over
torch in input order (one encode call per batch: `TextEncoder` before ONNX Runtime and length sorting),
and the minimum cosine between the two backends' vectors.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from annomine.demo_shop import generate_products, generate_queries
from annomine.encoders import TextEncoder
from annomine.text import product_text
from common import Timer, emit


def timed(encode, texts: list[str]) -> tuple[float, np.ndarray]:
    """Texts per second of one run, and its vectors."""
    with Timer() as t:
        vectors = encode(texts)
    return len(texts) / t.seconds, vectors


def in_input_order(encoder: TextEncoder):
    """The encoder run one batch per call: batches in input order, as TextEncoder ran before."""
    size = encoder.batch_size
    return lambda texts: np.concatenate([encoder.encode(texts[i:i + size]) for i in range(0, len(texts), size)])


def compare(side: str, unit: str, texts: list[str], max_length: int, args, torch_enc: TextEncoder, onnx_enc: TextEncoder) -> None:
    for enc in (torch_enc, onnx_enc):
        enc.max_length = max_length
        enc.encode(texts[:64])  # warm-up (and ONNX Runtime's first-shape allocations)
    rates = {"torch": 0.0, "onnx": 0.0, "torch_input_order": 0.0}
    vectors = {}
    for _ in range(args.repeats):  # alternate, so a load spike hits both
        runs = [("torch", torch_enc.encode), ("onnx", onnx_enc.encode)]
        if not args.skip_input_order:
            runs.append(("torch_input_order", in_input_order(torch_enc)))
        for name, encode in runs:
            rate, vectors[name] = timed(encode, texts)
            rates[name] = max(rates[name], rate)
    threads = torch.get_num_threads()
    what = f"MiniLM {side} encode ({len(texts):,} texts, {max_length} tokens, batch {args.batch_size}, {threads} threads)"
    emit(f"{what}, torch", round(rates["torch"], 1), unit)
    emit(f"{what}, ONNX Runtime", round(rates["onnx"], 1), unit)
    emit(f"{what}, ratio ONNX Runtime / torch", round(rates["onnx"] / rates["torch"], 2), "x")
    if not args.skip_input_order:
        emit(f"{what}, torch in input order (before length sorting)", round(rates["torch_input_order"], 1), unit)
        emit(f"{what}, ratio ONNX Runtime / torch in input order", round(rates["onnx"] / rates["torch_input_order"], 2), "x")
    a, b = vectors["onnx"], vectors["torch"]
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    emit(f"{what}, min cosine ONNX Runtime vs torch", round(float(cosine.min()), 6), "cosine")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="catalog texts (queries: as many, cycled)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-input-order", action="store_true", help="leave out the torch input-order run")
    parser.add_argument("--side", choices=("both", "item", "query"), default="both")
    args = parser.parse_args()
    products = generate_products(args.n, random.Random(1), seed=1)
    items = [product_text(p.title, None, p.description) for p in products]
    queries = [q["query"] for q in generate_queries(args.n, random.Random(2))]
    queries = (queries * (args.n // max(1, len(queries)) + 1))[:args.n]
    torch_enc = TextEncoder("minilm", batch_size=args.batch_size, backend="torch")
    onnx_enc = TextEncoder("minilm", batch_size=args.batch_size, backend="onnx")
    if onnx_enc.backend != "onnx":
        raise SystemExit("ONNX Runtime is not usable here (see the warning above)")
    if args.side in ("both", "item"):
        compare("catalog", "products/s", items, 64, args, torch_enc, onnx_enc)
    if args.side in ("both", "query"):
        compare("query", "queries/s", queries, 16, args, torch_enc, onnx_enc)


if __name__ == "__main__":
    main()
