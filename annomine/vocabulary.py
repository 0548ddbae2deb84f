"""Names shared across stages: the retrieval channels and the five mining classes.

Plain constants, no imports: schemas, SQL generation, mining, curriculum and the channel registry
all read them from here, so a name is spelled once.

Channels
--------
`CHANNELS` is the canonical order of the built-in channels. It is also the built-in part of the
channel registry (`annomine.retrievers.registry`): each name `c` resolves to the module
`annomine.retrievers.<c>`, whose `CHANNEL` says how to build it. Adding a channel is that module
plus its name here. The order fixes the per-channel columns of `mined_candidates`
(`rank_<c>`, `score_<c>`), the channel pairs of the overlap report and the 'lexical+bm25'
spelling of the views.

Mining classes
--------------
The set-logic classes of `annomine.mining`, each with its difficulty level (1 = easiest).
"""

from __future__ import annotations

LEXICAL = "lexical"
BM25 = "bm25"
ANN = "ann"

# Built-in channels, in canonical order (append a new channel's name here).
CHANNELS: tuple[str, ...] = (LEXICAL, BM25, ANN)

EASY_POSITIVE = "easy_positive"
HARD_POSITIVE = "hard_positive"
HARD_NEGATIVE = "hard_negative"
TOKEN_SIMILAR_NEGATIVE = "token_similar_negative"
RANDOM_NEGATIVE = "random_negative"

# Mining class -> difficulty level, in level order.
CLASS_LEVELS: dict[str, int] = {
    EASY_POSITIVE: 1,
    HARD_POSITIVE: 2,
    HARD_NEGATIVE: 3,
    TOKEN_SIMILAR_NEGATIVE: 4,
    RANDOM_NEGATIVE: 5,
}
CLASSES: tuple[str, ...] = tuple(CLASS_LEVELS)
POSITIVE_CLASSES: tuple[str, ...] = (EASY_POSITIVE, HARD_POSITIVE)
NEGATIVE_CLASSES: tuple[str, ...] = (HARD_NEGATIVE, TOKEN_SIMILAR_NEGATIVE, RANDOM_NEGATIVE)

__all__ = [
    "ANN", "BM25", "CHANNELS", "CLASSES", "CLASS_LEVELS", "EASY_POSITIVE", "HARD_NEGATIVE", "HARD_POSITIVE", "LEXICAL",
    "NEGATIVE_CLASSES", "POSITIVE_CLASSES", "RANDOM_NEGATIVE", "TOKEN_SIMILAR_NEGATIVE",
]
