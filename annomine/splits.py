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
both. Running the selection and the report once per fold, then pooling the two test reports (`python -m
lab.pool`), reports every held-out query once, each by a model that was not selected on it.

Rotations move the held-out block itself, so that other queries are held out and the judge and every training
set are made again without them (`project.rotation`, each rotation in a warehouse of its own). Rotation r holds
out the buckets [r * DEV_FRACTION, (r + 1) * DEV_FRACTION) (the last block is cut at 1), its first half
(TEST_FRACTION / DEV_FRACTION of it) test in fold 0. Rotation 0 is the committed split above; with DEV_FRACTION
0.3 the four rotations hold out every open query exactly once ([0, .3), [.3, .6), [.6, .9), [.9, 1)), and
pooling every rotation's two folds (`python -m lab.pool --rotations`) reports each open labelled query once,
by a model, a judge and training sets that never saw its labels.
"""

from __future__ import annotations

import hashlib
import math

TEST_FRACTION = 0.15
DEV_FRACTION = 0.3  # the upper end of the dev bucket: dev is [TEST_FRACTION, DEV_FRACTION)
SEED = 13
SPLITS = ("train", "dev", "test")
FOLDS = (0, 1)


def rotations(dev_fraction: float = DEV_FRACTION) -> tuple[int, ...]:
    """The rotations that hold out every bucket once: ceil(1 / dev_fraction) of them (4 at 0.3)."""
    if not 0 < dev_fraction <= 1:
        return (0,)
    return tuple(range(int(math.ceil(round(1 / dev_fraction, 9)))))


ROTATIONS = rotations()


def held_out_block(rotation: int = 0, dev_fraction: float = DEV_FRACTION) -> tuple[float, float]:
    """[low, high) of the buckets rotation `rotation` holds out (dev and test)."""
    check_rotation(rotation, dev_fraction)
    return rotation * dev_fraction, min((rotation + 1) * dev_fraction, 1.0)


def bucket(query_id: str, seed: int = SEED) -> float:
    """A stable number in [0, 1) for a query id."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION, fold: int = 0, rotation: int = 0) -> str:
    """Rotation 0, fold 0: 'test' (bucket < test_fraction), 'dev' (< dev_fraction) or 'train'. Fold 1: the
    same with 'test' and 'dev' swapped. Another rotation: the same within its own held-out block."""
    if not 0 <= test_fraction <= dev_fraction <= 1:
        raise ValueError(f"need 0 <= test_fraction ({test_fraction}) <= dev_fraction ({dev_fraction}) <= 1")
    check_fold(fold)
    low, high = held_out_block(rotation, dev_fraction)
    b = bucket(str(query_id), seed)
    if not low <= b < high:
        return "train"
    middle = low + (high - low) * test_fraction / dev_fraction
    return "test" if (b < middle) == (fold == 0) else "dev"


def check_fold(fold: int) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS} (0: the committed split; 1: dev and test swapped), got {fold!r}")


def check_rotation(rotation: int, dev_fraction: float = DEV_FRACTION) -> None:
    allowed = rotations(dev_fraction)
    if rotation not in allowed:
        raise ValueError(f"rotation must be one of {allowed} (which block of the open labelled queries is held out; "
                         f"0: the committed split), got {rotation!r}")


def is_dev(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
           test_fraction: float = TEST_FRACTION, fold: int = 0, rotation: int = 0) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction, fold, rotation) == "dev"


def is_test(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
            test_fraction: float = TEST_FRACTION, fold: int = 0, rotation: int = 0) -> bool:
    return split_of(query_id, dev_fraction, seed, test_fraction, fold, rotation) == "test"


def held_out(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED,
             test_fraction: float = TEST_FRACTION, rotation: int = 0) -> bool:
    """Dev or test: a query no training set of this rotation may contain."""
    return split_of(query_id, dev_fraction, seed, test_fraction, rotation=rotation) != "train"
