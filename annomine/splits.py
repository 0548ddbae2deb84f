"""Deterministic splits of the human-labelled queries, by query (never by pair).

`split_of(query_id)` hashes the id with a seed, so every stage agrees on which labelled queries
are `dev` (model selection, judge validation) and which are `train` (judge training and
calibration, allowed in training sets) without storing a list, and a new query (such as the
held-out ones nobody here can see) falls into a split by the same rule without anything
depending on which queries those are.
"""

from __future__ import annotations

import hashlib

DEV_FRACTION = 0.3
SEED = 13


def bucket(query_id: str, seed: int = SEED) -> float:
    """A stable number in [0, 1) for a query id."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED) -> str:
    return "dev" if bucket(str(query_id), seed) < dev_fraction else "train"


def is_dev(query_id: str, dev_fraction: float = DEV_FRACTION, seed: int = SEED) -> bool:
    return split_of(query_id, dev_fraction, seed) == "dev"
