"""Text clean-up shared by ingestion and every model: mojibake repair, HTML stripping, encoding checks.

Plain Python functions (unit-testable) with pandas-UDF wrappers for use inside Spark.
"""

from __future__ import annotations

import html
import re

import pandas as pd

_MOJIBAKE_MARKERS = re.compile("[ÃÂâ][\u0080-\u00bf\u2018-\u203a\u20ac\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc]")
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_BAD_CHARS = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f]")


def repair_mojibake(text: str | None) -> str | None:
    """Undo UTF-8 bytes that were decoded as cp1252/latin-1 ('dÃ©cor' -> 'décor'); else unchanged."""
    if not text or not _MOJIBAKE_MARKERS.search(text):
        return text
    for codec in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(codec).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if len(fixed) < len(text):
            return fixed
    return text


def strip_html(text: str | None) -> str:
    if not text:
        return ""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()


def encoding_problem(text: str | None) -> str | None:
    """A reason string when `text` holds undecodable or control characters, else None."""
    if text and _BAD_CHARS.search(text):
        bad = _BAD_CHARS.search(text).group(0)
        return f"bad encoding: character U+{ord(bad):04X}"
    return None


def product_text(title: str | None, attributes: str | None, description: str | None, max_chars: int = 1000) -> str:
    """The one text every model sees for a product: title | attributes | description."""
    parts = [strip_html(title)]
    if attributes:
        parts.append(strip_html(attributes))
    desc = strip_html(description)
    if desc:
        parts.append(desc)
    return " | ".join(p for p in parts if p)[:max_chars]


_TOKEN = re.compile(r"[a-z0-9]+")


def normalise_query(text: str | None) -> str:
    return " ".join(_TOKEN.findall((text or "").lower()))


def pandas_repair_mojibake(s: pd.Series) -> pd.Series:
    return s.map(repair_mojibake)


def pandas_encoding_problem(s: pd.Series) -> pd.Series:
    return s.map(encoding_problem)


def pandas_product_text(title: pd.Series, attributes: pd.Series, description: pd.Series) -> pd.Series:
    return pd.Series([product_text(t, a, d) for t, a, d in zip(title, attributes, description)], index=title.index)
