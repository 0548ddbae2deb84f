"""Catalog encoding throughput with MiniLM (products/s), item texts truncated at 64 tokens."""

from __future__ import annotations

import argparse
import random

import torch

from annomine.demo_shop import generate_products
from annomine.encoders import TextEncoder
from annomine.text import product_text
from common import Timer, emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    products = generate_products(args.n, random.Random(1), seed=1)
    texts = [product_text(p.title, None, p.description) for p in products]
    encoder = TextEncoder("minilm", max_length=64, batch_size=args.batch_size)
    encoder.encode(texts[:64])  # warm-up
    with Timer() as t:
        encoder.encode(texts)
    emit(f"MiniLM catalog encode ({args.n:,} products, 64 tokens, batch {args.batch_size}, {torch.get_num_threads()} threads)",
         round(args.n / t.seconds, 1), "products/s")


if __name__ == "__main__":
    main()
