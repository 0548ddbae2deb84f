"""Where the stacked tier-1 judge's grading time goes, and its bi-encoder feature in token-count order.

On a warehouse with a trained judge and mined candidates (a CrowdFlower run), in one process:
- `predict_proba` split into the cross-encoder (`ce_proba`) and the stack's features (`stack.pair_features`:
  the MiniLM bi-encoder cosine of query and product text, and coverage), on `--pairs` mined pairs (seeded);
- the features again with the ANN channel's product vectors given to the bi-encoder (`product_embeddings`);
- the bi-encoder on `--texts` product texts in input order (the tokenizer padding each batch) against
  `BiEncoder.encode` (batches of similar token counts), with the largest difference of an embedding.

    python benchmarks/bench_tier1_parts.py --warehouse warehouse/crowdflower --pairs 3000 --texts 2500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import Timer, emit  # noqa: E402


def tables(warehouse: Path, n_pairs: int, seed: int = 3):
    from deltalake import DeltaTable

    base = warehouse / "annomine"
    mined = DeltaTable(str(base / "mined_candidates")).to_pandas(columns=["query_id", "product_id", "query"])
    products = DeltaTable(str(base / "products")).to_pandas(columns=["product_id", "text"])
    pairs = mined.sample(min(n_pairs, len(mined)), random_state=seed).merge(products, on="product_id")
    return pairs.assign(text=pairs["text"].fillna("")), products["text"].fillna("").tolist()


def stored_vectors(warehouse: Path, key: str) -> dict:
    """{product text: vector} of the products whose `key` vector in product_embeddings is of their current text."""
    from deltalake import DeltaTable

    base = warehouse / "annomine"
    vectors = DeltaTable(str(base / "product_embeddings")).to_pandas()
    products = DeltaTable(str(base / "products")).to_pandas(columns=["product_id", "content_hash", "text"])
    current = vectors[vectors["model"] == key].merge(products, on=["product_id", "content_hash"])
    return {t: np.asarray(e, dtype=np.float32) for t, e in zip(current["text"], current["embedding"]) if isinstance(t, str)}


def features_with_stored_vectors(warehouse: Path, judge, queries, texts, probs, encoded_seconds: float, n: str) -> None:
    """The stack's features again, its bi-encoder given the ANN channel's product vectors (what annotate, judge
    train and rank do), against encoding the texts: seconds, and the largest difference of a feature and of a
    stacked probability."""
    from annomine.judges.stack import pair_features, shared_vector_key

    bi = judge.biencoder
    encoded = pair_features(queries, texts, probs, judge.grades, bi, judge.stack.columns)  # from the cache: the same
    bi._cache.clear()
    with Timer() as given:
        bi.remember(*zip(*stored_vectors(warehouse, shared_vector_key({"base_model": bi.base_model,
                                                                         "max_length": bi.max_length})).items()))
        stored = pair_features(queries, texts, probs, judge.grades, bi, judge.stack.columns)
    diff = float(np.abs(stored.to_numpy() - encoded.to_numpy()).max())
    p_diff = float(np.abs(judge.stack.predict_proba(stored, judge.grades) - judge.stack.predict_proba(encoded, judge.grades)).max())
    emit(f"tier-1 grading, the stack's features with the ANN channel's product vectors (read included), {n}",
         round(given.seconds, 1), "s", ratio=round(encoded_seconds / given.seconds, 2), max_feature_diff=diff,
         max_probability_diff=p_diff)


def straight_encode(bi, texts: list[str]) -> np.ndarray:
    """The bi-encoder in input order, each batch padded by the tokenizer to its longest text."""
    import torch

    from annomine.bert import mean_pool

    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), bi.batch_size):
            enc = bi.tokenizer(texts[s:s + bi.batch_size], padding=True, truncation=True, max_length=bi.max_length,
                               return_tensors="pt")
            pooled = mean_pool(bi.bert(**enc).last_hidden_state, enc["attention_mask"])
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warehouse", required=True)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--texts", type=int, default=2500)
    args = ap.parse_args()
    from annomine.judges.cross_encoder import load_cached
    from annomine.judges.stack import pair_features

    warehouse = Path(args.warehouse)
    folder = warehouse / "judges" / json.loads((warehouse / "judges" / "current.json").read_text())["path"]
    judge = load_cached(folder)
    pairs, catalog = tables(warehouse, args.pairs)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    with Timer() as ce:
        probs = judge.ce_proba(queries, texts, 64)
    with Timer() as feats:
        pair_features(queries, texts, probs, judge.grades, judge.biencoder, judge.stack.columns)
    n = f"{len(pairs):,} mined CrowdFlower pairs ({len(set(texts)):,} product texts, {len(set(queries)):,} queries)"
    emit(f"tier-1 grading, the cross-encoder (ce_proba), {n}", round(ce.seconds, 1), "s")
    emit(f"tier-1 grading, the stack's features (bi-encoder cosine, coverage), {n}", round(feats.seconds, 1), "s")
    features_with_stored_vectors(warehouse, judge, queries, texts, probs, feats.seconds, n)
    sample = catalog[: args.texts]
    judge.biencoder._cache.clear()
    with Timer() as straight:
        old = straight_encode(judge.biencoder, sample)
    with Timer() as ordered:
        new = judge.biencoder.encode(sample)
    what = f"{len(sample):,} CrowdFlower product texts, {judge.biencoder.max_length} tokens"
    emit(f"stack bi-encoder in input order, {what}", round(straight.seconds, 1), "s")
    emit(f"stack bi-encoder in token-count order (BiEncoder.encode), {what}", round(ordered.seconds, 1), "s",
         ratio=round(straight.seconds / ordered.seconds, 2), max_abs_diff=float(np.abs(old - new).max()))


if __name__ == "__main__":
    main()
