"""Tokenisation shared by the lexical and BM25 channels: normalise, split, drop stopwords, stem.

The stemmer is a light English suffix stripper (plurals, -ing, -ed, -ly, -er/-est on long
words). It only has to map a query word and a catalog word to the same stem, consistently.
"""

from __future__ import annotations

import re
import unicodedata

_TOKEN = re.compile(r"[a-z]+|[0-9]+(?:\.[0-9]+)?")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have in into is it its of on or that the this to was were will with "
    "your you our &".split()
)
_VOWEL = re.compile(r"[aeiouy]")


def normalise(text: str | None) -> str:
    """Lower case, accents removed, HTML entities and punctuation left to the tokenizer."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKD", str(text))
    return "".join(ch for ch in text if not unicodedata.combining(ch)).lower()


def stem(word: str) -> str:
    """Light English stemmer: 'pillows' -> 'pillow', 'batteries' -> 'battery', 'running' -> 'run'."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and _VOWEL.search(word[:-len(suffix)]):
            base = word[:-len(suffix)]
            if len(base) >= 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]
            return base
    if word.endswith("ly") and len(word) > 5:
        return word[:-2]
    return word


def tokens(text: str | None) -> list[str]:
    """Normalised tokens without stemming or stopword removal ('16GB' -> ['16', 'gb'])."""
    return _TOKEN.findall(normalise(text))


def analyze(text: str | None) -> list[str]:
    """Tokens with stopwords removed and stems applied: the terms both channels index."""
    return [stem(t) for t in tokens(text) if t not in STOPWORDS]
