"""Tier 1's grade distribution for any (query, product text) pairs, scoring only what it has not scored yet.

The distribution is the judge's own (`CrossEncoderModel.predict_proba`: the stacked one when the judge has a
stack), as the annotate job sees it. Scores are kept per judge version in
`<warehouse>/cache/rank_tier1/<version>.parquet` (`cache_folder`), keyed by a hash of the query and the product text, so training, the
ablations and every evaluation of the same pairs score each pair once. The judge stage stores there what the published judge gave
the labelled pairs it graded (`remember`): rank and `best+ce` find most labelled pairs scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from annomine.judges.stack import judge_vector_key

log = logging.getLogger(__name__)

SAVE_EVERY = 2000  # pairs scored between two writes of the cache


def cache_folder(cache_root: Path) -> Path:
    """Where tier-1 scores are kept under a cache root (`<warehouse>/cache`)."""
    return Path(cache_root) / "rank_tier1"


def pair_key(query: str, text: str) -> str:
    return hashlib.sha256(f"{query}\t{text}".encode("utf-8")).hexdigest()[:24]


class Tier1Scores:
    """Tier 1 of the judge in `folder`, with a score cache in the folder `cache` (None: no cache)."""

    def __init__(self, folder: str | Path, cache: Path | None = None, batch_size: int = 64):
        self.folder = Path(folder).resolve()
        meta = json.loads((self.folder / "judge.json").read_text())
        self.grades = [int(g) for g in meta["grades"]]
        self.version = str(meta.get("version") or self.folder.name)
        # the `product_embeddings` key of product vectors the judge's stack can take instead of encoding the texts
        self.text_vector_key = judge_vector_key(meta)
        self.batch_size = batch_size
        self.file = Path(cache) / f"{self.version}.parquet" if cache is not None else None
        self._known: dict[str, np.ndarray] | None = None
        self.scored = 0  # pairs this process sent through the model

    @property
    def model(self):
        from annomine.judges.cross_encoder import load_cached

        return load_cached(self.folder)

    def _cache(self) -> dict[str, np.ndarray]:
        if self._known is None:
            self._known = {}
            if self.file is not None and self.file.is_file():
                cached = pd.read_parquet(self.file)
                self._known = dict(zip(cached["key"], np.stack(cached["probs"].to_numpy()) if len(cached) else []))
        return self._known

    def probs(self, queries: list[str], texts: list[str]) -> np.ndarray:
        """(n, n_grades) tier-1 probabilities."""
        known = self._cache()
        keys = [pair_key(q, t) for q, t in zip(queries, texts)]
        todo = {k: (q, t) for k, q, t in zip(keys, queries, texts) if k not in known}
        if todo:
            log.info("tier 1: scoring %d new pairs (%d cached)", len(todo), len(keys) - len(todo))
        pending = list(todo.items())
        for start in range(0, len(pending), SAVE_EVERY):  # saved as it goes: an interrupted run keeps its scores
            chunk = pending[start:start + SAVE_EVERY]
            probs = self.model.predict_proba([q for _, (q, _) in chunk], [t for _, (_, t) in chunk],
                                             batch_size=self.batch_size)
            known.update(zip((k for k, _ in chunk), np.asarray(probs, dtype=float)))
            self.scored += len(chunk)
            self._save()
            if len(pending) > SAVE_EVERY:
                log.info("tier 1: %d of %d new pairs scored", min(start + SAVE_EVERY, len(pending)), len(pending))
        if not keys:
            return np.zeros((0, len(self.grades)))
        return np.stack([known[k] for k in keys])

    def remember(self, queries: list[str], texts: list[str], probs) -> int:
        """Keep distributions this judge gave these pairs elsewhere (the judge stage's labelled pairs), so they are
        not scored again; pairs already kept stay as they are. How many were added."""
        known = self._cache()
        before = len(known)
        for query, text, row in zip(queries, texts, np.asarray(probs, dtype=float)):
            known.setdefault(pair_key(query, text), row)
        if len(known) > before:
            self._save()
        return len(known) - before

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Tier 1's grades under its decision rule."""
        return np.asarray(self.model.decide(np.asarray(probs)), dtype=int)

    def _save(self) -> None:
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        known = self._cache()
        frame = pd.DataFrame({"key": list(known), "probs": [list(map(float, v)) for v in known.values()]})
        tmp = self.file.with_name(self.file.stem + f".{os.getpid()}.tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.file)
