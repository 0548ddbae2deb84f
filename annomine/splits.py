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

Folds: the held-out bucket [0, DEV_FRACTION) is two halves, and `fold` says which half reports. Fold 0 (the
default, every committed figure) is the split above; fold 1 swaps the roles, so the old test queries select
and the old dev queries report. The train queries, hence the judge and every training set, are the same in
both. Running the selection and the report once per fold, then pooling the two test reports (`annomine
evaluate --pool-folds`), reports every held-out query once, each by a model that was not selected on it.
"""

from __future__ import annotations

import hashlib

TEST_FRACTION = 0.15
DEV_FRACTION = 0.3  # the upper end of the dev bucket: dev is [TEST_FRACTION, DEV_FRACTION)
SEED = 13
SPLITS = ("train", "dev", "test")
FOLDS = (0, 1)


def bucket(query_id: str, seed: int = SEED) -> float:
    """A stable number in [0, 1) for a query id."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION, fold: int = 0) -> str:
    """Fold 0: 'test' (bucket < test_fraction), 'dev' (< dev_fraction) or 'train'. Fold 1: the same with
    'test' and 'dev' swapped."""
    if not 0 <= test_fraction <= dev_fraction <= 1:
        raise ValueError(f"need 0 <= test_fraction ({test_fraction}) <= dev_fraction ({dev_fraction}) <= 1")
    check_fold(fold)
    b = bucket(str(query_id), seed)
    if b >= dev_fraction:
        return "train"
    return "test" if (b < test_fraction) == (fold == 0) else "dev"


def check_fold(fold: int) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS} (0: the committed split; 1: dev and test swapped), got {fold!r}")


def is_dev(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
           test_fraction: float = TEST_FRACTION, fold: int = 0) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction, fold) == "dev"


def is_test(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
            test_fraction: float = TEST_FRACTION, fold: int = 0) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction, fold) == "test"


def held_out(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION) -> bool:
    """Dev or test: a query no training set may contain."""
    return split_of(query_id, dev_fraction, seed, test_fraction) != "train"
