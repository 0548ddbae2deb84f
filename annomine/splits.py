"""Deterministic splits of the human-labelled queries, by query (never by pair).

`split_of(query_id)` hashes the id with a seed into a bucket in [0, 1): below `TEST_FRACTION` it is
`test`, below `DEV_FRACTION` `dev`, else `train`. Every stage agrees on the split of a query without
storing a list, and a new query (such as the held-out ones nobody here can see) falls into a split by
the same rule without anything depending on which queries those are.

- `train`: judge training and calibration; the only labelled queries allowed in training sets.
- `dev`: selection: the judge's validation, the trainer's per-stage / per-epoch checks, settings,
  model registration.
- `test`: reporting only (`annomine evaluate`'s default). Never trained on, never used to choose
  anything. It is carved out of the old dev bucket (buckets < 0.3 were dev), so the train queries,
  hence the judge's training data, are what they were before the split existed.
"""

from __future__ import annotations

import hashlib

TEST_FRACTION = 0.15
DEV_FRACTION = 0.3  # the upper end of the dev bucket: dev is [TEST_FRACTION, DEV_FRACTION)
SEED = 13
SPLITS = ("train", "dev", "test")


def bucket(query_id: str, seed: int = SEED) -> float:
    """A stable number in [0, 1) for a query id."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION) -> str:
    """'test' (bucket < test_fraction), 'dev' (< dev_fraction) or 'train'."""
    if not 0 <= test_fraction <= dev_fraction <= 1:
        raise ValueError(f"need 0 <= test_fraction ({test_fraction}) <= dev_fraction ({dev_fraction}) <= 1")
    b = bucket(str(query_id), seed)
    if b < test_fraction:
        return "test"
    return "dev" if b < dev_fraction else "train"


def is_dev(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
           test_fraction: float = TEST_FRACTION) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction) == "dev"


def is_test(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
            test_fraction: float = TEST_FRACTION) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction) == "test"


def held_out(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION) -> bool:
    """Dev or test: a query no training set may contain."""
    return split_of(query_id, dev_fraction, seed, test_fraction) != "train"
