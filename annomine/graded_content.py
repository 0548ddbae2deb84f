"""What a judge's grade was given for: a hash of the query text and the product text the judge reads.

`annotations.content_hash` records it for each grade; annotate grades a pair again, and curriculum
uses no grade, when the pair's current hash differs (a retitled product, an edited query).
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

SEPARATOR = "\x1f"  # the ASCII unit separator (char(31) in sql/00_views.sql): in no query or product text


def content_hash(query: Column, text: Column) -> Column:
    """SHA-256 (hex) of the query text and the product text, a missing one counting as empty."""
    return F.sha2(F.concat_ws(SEPARATOR, F.coalesce(query, F.lit("")), F.coalesce(text, F.lit(""))), 256)


def content_hash_of(query: str | None, text: str | None) -> str:
    """`content_hash` of one pair, in Python."""
    return hashlib.sha256(f"{query or ''}{SEPARATOR}{text or ''}".encode("utf-8")).hexdigest()
