"""The batch bookkeeping tables: `llm_batches` (one row per batch) and `llm_batch_requests` (one row per request).

Both are written by MERGE on their key, whole rows, so writing a row again (a resumed run) changes nothing twice.
"""

from __future__ import annotations

import pandas as pd

BATCHES, REQUESTS = "llm_batches", "llm_batch_requests"
# Batch states after which nothing more comes from the endpoint.
FINAL = ("collected", "failed", "expired", "cancelled", "lost")


def now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def read(tables, name: str) -> pd.DataFrame:
    from annomine.schemas import TABLES

    if not tables.exists(name):
        return pd.DataFrame({c: [] for c in TABLES[name].columns})
    return tables.read(name).toPandas()


def put(tables, name: str, rows: list[dict]) -> int:
    """MERGE whole rows into `name` (a row with the same key is replaced)."""
    if not rows:
        return 0
    from annomine.judges.response_cache import ensure_created
    from annomine.schemas import TABLES

    spec = TABLES[name]
    frame = pd.DataFrame(rows).reindex(columns=spec.columns)
    for c in ("request_count",):
        if c in frame:
            frame[c] = frame[c].astype("Int64")
    if "attempts" in frame:
        frame["attempts"] = frame["attempts"].astype("Int32")
    frame = frame.astype(object).where(frame.notna(), None)
    ensure_created(tables, name)
    tables.merge(name, tables.spark.createDataFrame(frame, schema=spec.schema))
    return len(rows)


def live_batches(batches: pd.DataFrame) -> pd.DataFrame:
    return batches[~batches["state"].isin(FINAL)]


def pending_keys(requests: pd.DataFrame, batches: pd.DataFrame) -> set[str]:
    """The requests waiting in a batch the endpoint may still answer (never submitted again meanwhile)."""
    live = set(live_batches(batches)["submission_id"])
    waiting = requests[(requests["state"] == "pending") & requests["submission_id"].isin(live)]
    return set(waiting["custom_id"])


def failed_keys(requests: pd.DataFrame) -> dict[str, tuple[int, str]]:
    """{custom_id: (batches it was sent in, its last error)} of the requests whose line failed."""
    rows = requests[requests["state"] == "failed"]
    return {c: (int(a or 0), str(e)) for c, a, e in zip(rows["custom_id"], rows["attempts"], rows["error"])}
