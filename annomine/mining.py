"""Structured mining: set logic over the three retrieval channels into five difficulty levels.

Pure DataFrame transforms (no I/O); `jobs/mine.py` reads the tables and writes the result.

Pipeline (`mine_candidates`):

1. `split_logs`: log rows with a null key, an unknown channel or a rank < 1 go to quarantine.
2. `select_runs`: (ranks up to `max_rank`, the mining depth) the latest run per channel (greatest `logged_at`, then greatest `run_id`) or
   the configured `run_ids`.
3. `pivot_channels`: one row per (query, product) with rank/score per channel (null where the
   channel missed it), `n_channels`, `best_rank`, `worst_rank`, `rank_spread`. It also deduplicates:
   per channel the best rank, and the score of the best-ranked row (the highest among equal ranks):
   duplicate log rows count once.
4. `classify_channel_candidates`: rules 1-3 below on the pivoted rows.
5. `token_similar_pairs`: TF-IDF cosine of `products.text` vs the query over blocked pairs (rule 4).
6. `random_negative_pairs`: seeded sample from a fixed product pool (rule 5).
7. `apply_caps`: per-query caps and per-class quotas. Precedence is structural: rules 1-3 are one
   CASE WHEN (first match wins) over pairs a channel returned; rules 4-5 take only pairs no
   channel returned (anti-join), and rule 5 anti-joins rule 4's pairs.

Classes, in precedence order (a (query, product) matching several rules gets the FIRST one):

====  =========================  ===========================================================
lvl   class                      rule (each threshold is a `MiningRules` field)
====  =========================  ===========================================================
1     easy_positive              found by all channels in `easy_channels`, each within `easy_top_k`
2     hard_positive              within `hard_positive_top_k` of any `hard_positive_channels`
                                 (lexical OR bm25: both are lexical systems) and absent from every
                                 `hard_positive_missed_by` channel (ann)
3     hard_negative              found by exactly one channel, within `hard_negative_top_k`
                                 (so, after rule 2: ann-only, or lexical-only beyond rank 50)
4     token_similar_negative     found by no channel; TF-IDF cosine to the query in
                                 [`token_band_low`, `token_band_high`]
5     random_negative            found by no channel; seeded sample of the catalog, TF-IDF cosine
                                 below `random_max_similarity` (a near-duplicate is no random negative)
====  =========================  ===========================================================

A pair found by some channel but matching none of rules 1-3 (say lexical rank 3 + ann rank 40,
bm25 missing) is not mined (`unclassified`); rules 4 and 5 only take pairs no channel returned.
Positives and negatives are candidates: the annotate stage grades them.

Scaling of the token-similar band (no query x catalog cross join)
-----------------------------------------------------------------
Products and queries are tokenised into (doc, term, weight) rows, weights being sublinear TF x
smoothed IDF (as scikit-learn's TfidfVectorizer), L2-normalised per document, so the dot product
over shared terms IS the cosine in [0, 1]. Blocking: a pair is scored only when it shares a term
whose document frequency is <= `blocking_max_df` (and <= `blocking_max_df_ratio` x catalog size).
The blocking join emits at most sum over the query's rare terms of df(t) <= |q| x max_df pairs per
query, independent of catalog size; each blocked pair is then scored exactly (over all its
shared terms, frequent ones included) by a keyed join. Cost: O(catalog tokens) to build the
term table + O(queries x |q| x max_df) pairs, both hash joins on `term` / (product, term) that
shard across workers. A query sharing only frequent terms with a product never blocks with it,
which is the intended trade-off (such pairs are not token-similar "hard" negatives anyway).

Random negatives scale the same way: a fixed pool of `random_pool_size` products (smallest
seeded hash of product_id) and, per query, a seeded walk of max_negatives + 10 distinct pool
positions (see `random_negative_pairs`): queries x (max_negatives + 10) rows, never x catalog;
pairs any channel returned are anti-joined away.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from annomine.bounds import bounded
from annomine.vocabulary import (ANN, BM25, CHANNELS, CLASS_LEVELS, EASY_POSITIVE, HARD_NEGATIVE, HARD_POSITIVE, LEXICAL,
                                 NEGATIVE_CLASSES, POSITIVE_CLASSES, RANDOM_NEGATIVE, TOKEN_SIMILAR_NEGATIVE)

CLASSES = CLASS_LEVELS  # class -> difficulty level

# Small English stop list: terms that carry no product meaning never block or weigh in.
STOPWORDS = (
    "a an and are as at be by for from has have in is it its of on or that the this to was were will with "
    "you your our we all any can do not no but if so than too very s t x"
).split()


@dataclass
class MiningRules:
    """Every threshold of the set logic (paper defaults; conf/*.yaml tunes them per catalog)."""

    # Mining depth: log rows ranked deeper than this are ignored (the product counts as not found
    # by that channel); null: every logged rank.
    max_rank: int | None = bounded(None, ge=1)
    easy_top_k: int = bounded(10, ge=1)
    easy_channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    hard_positive_top_k: int = bounded(50, ge=1)
    hard_positive_channels: list[str] = field(default_factory=lambda: [LEXICAL, BM25])
    hard_positive_missed_by: list[str] = field(default_factory=lambda: [ANN])
    hard_negative_top_k: int = bounded(100, ge=1)
    token_band_low: float = 0.2
    token_band_high: float = 0.6
    blocking_max_df: int = bounded(5000, ge=1)
    blocking_max_df_ratio: float = bounded(0.05, gt=0, le=1)
    random_pool_size: int = bounded(2000, ge=1)
    random_max_similarity: float = bounded(0.6, gt=0, le=1)
    max_positives: int = bounded(50, ge=0)
    max_negatives: int = bounded(50, ge=0)
    # Per-class quotas filled first; unused room of a polarity goes to its other classes.
    class_quotas: dict[str, int] = field(default_factory=lambda: {
        EASY_POSITIVE: 25, HARD_POSITIVE: 25,
        HARD_NEGATIVE: 20, TOKEN_SIMILAR_NEGATIVE: 20, RANDOM_NEGATIVE: 10,
    })
    seed: int = 13

    def validate(self) -> None:
        for name in ("easy_channels", "hard_positive_channels", "hard_positive_missed_by"):
            unknown = [c for c in getattr(self, name) if c not in CHANNELS]
            if unknown:
                raise ValueError(f"{name}: unknown channel(s) {unknown}; channels are {list(CHANNELS)}")
        if not self.easy_channels or not self.hard_positive_channels:
            raise ValueError("easy_channels and hard_positive_channels must not be empty")
        if set(self.hard_positive_channels) & set(self.hard_positive_missed_by):
            raise ValueError("hard_positive_channels and hard_positive_missed_by must not overlap")
        if not 0.0 <= self.token_band_low < self.token_band_high <= 1.0:
            raise ValueError(f"token band must satisfy 0 <= low < high <= 1, got [{self.token_band_low}, {self.token_band_high}]")
        unknown = sorted(set(self.class_quotas) - set(CLASSES))
        if unknown:
            raise ValueError(f"class_quotas: unknown class(es) {unknown}; classes are {list(CLASSES)}")
        bad = {k: v for k, v in self.class_quotas.items() if v < 0}
        if bad:
            raise ValueError(f"class_quotas must be >= 0, got {bad}")

    def quota(self, cls: str) -> int:
        cap = self.max_positives if cls in POSITIVE_CLASSES else self.max_negatives
        return min(self.class_quotas.get(cls, cap), cap)

    def max_df(self, n_products: int) -> int:
        return max(1, min(self.blocking_max_df, math.ceil(self.blocking_max_df_ratio * n_products)))


# ---- 1-2. log hygiene ------------------------------------------------------------------------

LOG_KEY = ("run_id", "query_id", "channel", "product_id")


def split_logs(logs: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(good, bad) log rows; bad rows carry `_reason` naming the field at fault."""
    blank = lambda c: F.col(c).isNull() | (F.trim(F.col(c)) == "")  # noqa: E731
    reason = (F.when(blank("run_id"), F.lit("run_id is null or empty"))
              .when(blank("query_id"), F.lit("query_id is null or empty"))
              .when(blank("product_id"), F.lit("product_id is null or empty"))
              .when(~F.col("channel").isin(*CHANNELS) | F.col("channel").isNull(),
                    F.concat(F.lit("channel must be one of " + "/".join(CHANNELS) + ", got "),
                             F.coalesce(F.col("channel"), F.lit("null"))))
              .when(F.col("rank").isNull() | (F.col("rank") < 1),
                    F.concat(F.lit("rank must be >= 1, got "), F.coalesce(F.col("rank").cast("string"), F.lit("null")))))
    marked = logs.withColumn("_reason", reason)
    return marked.where(F.col("_reason").isNull()).drop("_reason"), marked.where(F.col("_reason").isNotNull())


RAW_TIMESTAMP_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"  # 2026-01-02T12:00:00.000000Z in a UTC session


def quarantine_rows(bad: DataFrame, target: str = "mined_candidates", source: str = "retrieval_logs") -> DataFrame:
    """Bad log rows (with `_reason`) in the quarantine table's schema."""
    raw_cols = [f for f in bad.schema.fields if f.name != "_reason"]
    # timestamps written by an explicit pattern: to_json's own format differs between engines (Spark:
    # milliseconds, Sail: microseconds, and Sail ignores the timestampFormat option), and the key hashes it
    raw = F.to_json(F.struct(*[
        F.date_format(F.col(f.name), RAW_TIMESTAMP_FORMAT).alias(f.name) if isinstance(f.dataType, T.TimestampType)
        else F.col(f.name) for f in raw_cols]))
    key = F.concat(F.concat_ws("|", *[F.coalesce(F.col(c).cast("string"), F.lit("")) for c in LOG_KEY]),
                   F.lit("#"), F.substring(F.sha2(raw, 256), 1, 16))
    return bad.select(F.lit(target).alias("target_table"), F.lit(source).alias("source"), key.alias("record_key"),
                      F.col("_reason").alias("reason"), raw.alias("raw"), F.current_timestamp().alias("quarantined_at"))


def select_runs(logs: DataFrame, run_ids: list[str] | None = None) -> DataFrame:
    """Rows of the configured `run_ids`, or of the latest run of each channel.

    The latest runs (one per channel) are looked up once and become a filter on the rows, which the
    scan applies: each branch that reads the selected rows scans them without aggregating them again.
    """
    if run_ids:
        return logs.where(F.col("run_id").isin(*run_ids))
    latest = F.lit(False)
    for run in latest_runs(logs).collect():
        latest = latest | ((F.col("channel") == run["channel"]) & (F.col("run_id") == run["run_id"]))
    return logs.where(latest)


def latest_runs(logs: DataFrame) -> DataFrame:
    """(channel, run_id): per channel, the run of the greatest `logged_at`, then the greatest `run_id`."""
    runs = logs.groupBy("channel", "run_id").agg(F.max("logged_at").alias("_at"))
    w = Window.partitionBy("channel").orderBy(F.col("_at").desc_nulls_last(), F.col("run_id").desc())
    return runs.withColumn("_n", F.row_number().over(w)).where(F.col("_n") == 1).select("channel", "run_id")


def _dedupe_key() -> Column:
    """rank + 0.9 * (1/2 - atan(score)/pi): orders a channel's rows of one (query, product) by rank, then
    descending score (a null or NaN score last within its rank); the fraction never crosses to the next rank."""
    score = F.coalesce(F.col("score"), F.lit(-1e300))
    rank = F.col("rank").cast("double")
    return F.nanvl(rank + F.lit(0.9) * (F.lit(0.5) - F.atan(score) / F.lit(math.pi)), rank + F.lit(0.9))


# ---- 3-4. rank metadata and channel classes ---------------------------------------------------

def pivot_channels(logs: DataFrame, checkpoint: Callable[[DataFrame, str], DataFrame] | None = None) -> DataFrame:
    """Selected log rows (duplicates allowed) -> one row per (query_id, product_id) with per-channel ranks.

    rank_<ch> is the channel's best rank for the pair, score_<ch> the score of its best-ranked row (the
    highest among equal ranks, a null or NaN score last); a channel without rows gets null.

    Most cells (a pair in one channel) hold one log row, and their rank and score are plain `min` and
    `max` in one aggregation over the rows (`channel_cells`). Only the pairs with a repeated row are
    resolved by the tie rule (`pivot_best_rows`, `min_by` on the rows of those pairs alone): Sail's `min_by`
    keeps a boxed accumulator per group and reads row by row, and on every pair of a 10M-row log it takes
    2.3x the time and the memory of this pivot. `checkpoint` materialises the cells and the repeated pairs
    (each is read twice). Without one (the job on Unity Catalog, whose engine is Spark's, not Sail), the cells
    would be aggregated again for each reader, and the tie rule's single aggregation is taken instead.
    """
    if checkpoint is None:
        return pivot_best_rows(logs)
    cells = checkpoint(channel_cells(logs), "pivot_cells")
    one_row_each = F.col("_rows") == _channels_found()
    repeated = cells.where(~one_row_each).select("query_id", "product_id")
    resolved = checkpoint(pivot_best_rows(logs.join(repeated, on=["query_id", "product_id"], how="left_semi")),
                          "pivot_repeated")
    return cells.where(one_row_each).drop("_rows").unionByName(resolved)


def channel_cells(logs: DataFrame) -> DataFrame:
    """One row per (query_id, product_id): per channel the least rank and the greatest score, and `_rows`
    the number of log rows. Where `_rows` equals the channels found, each channel has one row, whose
    score the `max` is (a NaN or null one included)."""
    aggs = _per_channel(lambda mine: F.max(F.when(mine, F.col("score"))))
    return logs.groupBy("query_id", "product_id").agg(F.count(F.lit(1)).alias("_rows"), *aggs)


def pivot_best_rows(logs: DataFrame) -> DataFrame:
    """The pivot by the tie rule on any rows: score_<ch> by `min_by` over `_dedupe_key` (the key of the
    other channels' rows being +inf so they never win). A window, or a min over a struct, is 10x slower
    and far hungrier on Sail than `min_by` on this numeric key."""
    key = _dedupe_key()
    aggs = _per_channel(lambda mine: F.min_by(F.when(mine, F.col("score")),
                                              F.when(mine, key).otherwise(F.lit(float("inf")))))
    return logs.groupBy("query_id", "product_id").agg(*aggs)


def _per_channel(score_of: Callable[[Column], Column]) -> list[Column]:
    """rank_<ch> (the least rank) and score_<ch> (`score_of(the channel's rows)`) for each channel, in the
    order of CHANNEL_COLUMNS."""
    aggs = []
    for ch in CHANNELS:
        mine = F.col("channel") == ch
        aggs.append(F.min(F.when(mine, F.col("rank"))).cast("int").alias(f"rank_{ch}"))
        aggs.append(score_of(mine).cast("double").alias(f"score_{ch}"))
    return aggs


def _channels_found() -> Column:
    """The number of channels with a rank in a pivoted row."""
    return sum((F.when(F.col(f"rank_{ch}").isNotNull(), 1).otherwise(0) for ch in CHANNELS), F.lit(0))


def logged_query_texts(logs: DataFrame) -> DataFrame:
    """(query_id, _lq): the greatest logged text of each query (used only for a query the queries table lacks)."""
    return logs.groupBy("query_id").agg(F.max("query").alias("_lq"))


def with_rank_metadata(pivoted: DataFrame) -> DataFrame:
    """Pivoted ranks + `n_channels`, `best_rank`, `worst_rank`, `rank_spread` (row-wise: derived where they
    are needed, before the classes and after the caps, cheaper than writing or sorting them)."""
    ranks = [F.col(f"rank_{ch}") for ch in CHANNELS]
    return (pivoted.withColumn("n_channels", _channels_found().cast("int"))
                   .withColumn("best_rank", F.least(*ranks).cast("int"))
                   .withColumn("worst_rank", F.greatest(*ranks).cast("int"))
                   .withColumn("rank_spread", (F.col("worst_rank") - F.col("best_rank")).cast("int")))


def _within(ch: str, k: int) -> Column:
    return F.col(f"rank_{ch}").isNotNull() & (F.col(f"rank_{ch}") <= k)


def channel_class(rules: MiningRules) -> Column:
    """Rules 1-3 as one CASE WHEN (first match wins); null when none matches."""
    easy = F.lit(True)
    for ch in rules.easy_channels:
        easy = easy & _within(ch, rules.easy_top_k)
    lexical = F.lit(False)
    for ch in rules.hard_positive_channels:
        lexical = lexical | _within(ch, rules.hard_positive_top_k)
    missed = F.lit(True)
    for ch in rules.hard_positive_missed_by:
        missed = missed & F.col(f"rank_{ch}").isNull()
    hard_neg = (F.col("n_channels") == 1) & (F.col("best_rank") <= rules.hard_negative_top_k)
    return (F.when(easy, F.lit(EASY_POSITIVE))
             .when(lexical & missed, F.lit(HARD_POSITIVE))
             .when(hard_neg, F.lit(HARD_NEGATIVE)))


def classify_channel_candidates(pivoted: DataFrame, rules: MiningRules) -> DataFrame:
    """Pivoted rows + `candidate_class` (null = unclassified) and `_priority` (lower = kept first)."""
    df = pivoted.withColumn("candidate_class", channel_class(rules))
    lexical_ranks = [F.col(f"rank_{ch}") for ch in rules.hard_positive_channels]
    lexical_best = F.least(*lexical_ranks) if len(lexical_ranks) > 1 else lexical_ranks[0]
    priority = (F.when(F.col("candidate_class") == HARD_POSITIVE, lexical_best)
                 .when(F.col("candidate_class") == EASY_POSITIVE, F.col("worst_rank"))
                 .otherwise(F.col("best_rank")))
    return df.withColumn("_priority", priority.cast("double"))


def _no_checkpoint(df: DataFrame, name: str) -> DataFrame:
    return df


# ---- 5. token similarity with blocking -----------------------------------------------------------

def _terms(df: DataFrame, id_col: str, text_col: str) -> DataFrame:
    """(id, term, tf): lower-cased alphanumeric tokens of length >= 2, stop words removed."""
    tokens = df.select(F.col(id_col), F.explode(F.split(F.lower(F.coalesce(F.col(text_col), F.lit(""))), "[^a-z0-9]+")).alias("term"))
    tokens = tokens.where((F.length("term") >= 2) & ~F.col("term").isin(*STOPWORDS))
    return tokens.groupBy(id_col, "term").agg(F.count(F.lit(1)).alias("tf"))


def _l2_normalise(weighted: DataFrame, id_col: str) -> DataFrame:
    """(id, term, w, df) with w divided by the document's L2 norm: a window over the document's rows
    (on Sail faster than a groupBy of the norms joined back to the rows, which hashes them twice)."""
    norm = F.sqrt(F.sum(F.col("w") * F.col("w")).over(Window.partitionBy(id_col)))
    return weighted.select(id_col, "term", (F.col("w") / norm).alias("w"), "df")


def _tfidf_weight(n_products: int) -> Column:
    """Sublinear TF x smoothed IDF (scikit-learn's TfidfVectorizer) from the columns `tf` and `df`."""
    idf = F.log(F.lit(float(n_products + 1)) / (F.col("df") + 1)) + 1.0
    return (1.0 + F.log(F.col("tf").cast("double"))) * idf


def catalog_terms(products: DataFrame, n_products: int) -> DataFrame:
    """(product_id, term, w, df) for the whole catalog: the catalog is tokenised once; df (a window
    over each term's rows) and the L2 norms both come from these term counts."""
    p_tf = _terms(products, "product_id", "text")
    p_tf = p_tf.withColumn("df", F.count(F.lit(1)).over(Window.partitionBy("term")))
    return _l2_normalise(p_tf.withColumn("w", _tfidf_weight(n_products)), "product_id")


def query_term_table(query_tf: DataFrame, product_terms: DataFrame, n_products: int) -> DataFrame:
    """(query_id, term, w, df): query term counts weighted by the catalog's df; terms absent from the
    catalog are dropped (as in a vectoriser fitted on the catalog)."""
    df_t = product_terms.select("term", "df").dropDuplicates(["term"])
    return _l2_normalise(query_tf.join(df_t, on="term").withColumn("w", _tfidf_weight(n_products)), "query_id")


def tfidf_tables(products: DataFrame, queries: DataFrame, n_products: int,
                 checkpoint: Callable[[DataFrame, str], DataFrame] | None = None) -> tuple[DataFrame, DataFrame]:
    """(product_terms, query_terms): (id, term, w, df) with L2-normalised TF-IDF weights.

    products: product_id, text. queries: query_id, query. IDF and the norms come from the whole
    catalog; product_terms then keeps only the terms some query has, the only ones a dot product
    or the blocking join can use (a fraction of the catalog's rows). `checkpoint` (see
    `mine_candidates`) materialises each table once.
    """
    checkpoint = checkpoint or _no_checkpoint
    query_tf = _terms(queries, "query_id", "query")
    vocabulary = query_tf.select("term").distinct()
    product_terms = catalog_terms(products, n_products).join(vocabulary, on="term", how="left_semi")
    product_terms = checkpoint(product_terms.select("product_id", "term", "w", "df"), "product_terms")
    query_terms = checkpoint(query_term_table(query_tf, product_terms, n_products), "query_terms")
    return product_terms, query_terms


def blocked_pairs(product_terms: DataFrame, query_terms: DataFrame, max_df: int) -> DataFrame:
    """Distinct (query_id, product_id) sharing at least one term with df <= max_df."""
    q = query_terms.where(F.col("df") <= max_df).select("query_id", "term")
    p = product_terms.where(F.col("df") <= max_df).select("product_id", "term")
    return q.join(p, on="term").select("query_id", "product_id").distinct()


def score_pairs(pairs: DataFrame, product_terms: DataFrame, query_terms: DataFrame) -> DataFrame:
    """pairs + `token_similarity`: exact TF-IDF cosine over all shared terms (0.0 when none).

    `pairs` holds each (query_id, product_id) once (every caller's pairs are distinct by
    construction), so no distinct pass precedes the dot products.
    """
    keys = pairs.select("query_id", "product_id")
    dots = (keys.join(query_terms.select("query_id", "term", F.col("w").alias("wq")), on="query_id")
                .join(product_terms.select("product_id", "term", F.col("w").alias("wp")), on=["product_id", "term"])
                .groupBy("query_id", "product_id").agg(F.sum(F.col("wq") * F.col("wp")).alias("_sim")))
    sim = F.least(F.lit(1.0), F.round(F.coalesce(F.col("_sim"), F.lit(0.0)), 9)).cast("double")
    return pairs.join(dots, on=["query_id", "product_id"], how="left").withColumn("token_similarity", sim).drop("_sim")


def token_similar_pairs(product_terms: DataFrame, query_terms: DataFrame, returned: DataFrame, rules: MiningRules,
                        n_products: int) -> DataFrame:
    """(query_id, product_id, token_similarity) in the band, for pairs no channel returned."""
    pairs = blocked_pairs(product_terms, query_terms, rules.max_df(n_products))
    pairs = pairs.join(returned, on=["query_id", "product_id"], how="left_anti")
    scored = score_pairs(pairs, product_terms, query_terms)
    return scored.where((F.col("token_similarity") >= rules.token_band_low) & (F.col("token_similarity") <= rules.token_band_high))


# ---- 6. random negatives -------------------------------------------------------------------------

def _primes_above(n: int, count: int) -> list[int]:
    out, k = [], max(n + 1, 2)
    while len(out) < count:
        if all(k % d for d in range(2, int(k ** 0.5) + 1)):
            out.append(k)
        k += 1
    return out


def random_negative_pairs(query_ids: DataFrame, products: DataFrame, returned: DataFrame, rules: MiningRules,
                          n_products: int, checkpoint: Callable[[DataFrame, str], DataFrame] | None = None) -> DataFrame:
    """(query_id, product_id, _priority): a seeded pseudo-random walk over a fixed product pool.

    The pool is the `random_pool_size` products with the smallest seeded hash (P of them). Each
    query visits pool positions (start + k * stride) mod P for k < m, with start and stride (a
    prime > P, so coprime with P: the m positions are distinct) hashed from (seed, query_id);
    m = max_negatives + 10 covers the pairs a channel returned (anti-joined away) and those too
    similar to the query. Queries x m rows: no query x catalog (nor x pool) cross join.
    `checkpoint` (see `mine_candidates`) materialises the pool, which two joins read.
    """
    seed = F.lit(int(rules.seed))
    size = max(1, min(int(rules.random_pool_size), int(n_products)))
    pool = (products.select("product_id").distinct()
                    .withColumn("_h", F.xxhash64(seed, F.lit("pool"), F.col("product_id")))
                    .orderBy("_h", "product_id").limit(size))
    pool = pool.withColumn("_idx", (F.row_number().over(Window.partitionBy(F.lit(0)).orderBy("_h", "product_id")) - 1).cast("long")).select("product_id", "_idx")
    pool = (checkpoint or _no_checkpoint)(pool, "random_pool")
    m = min(rules.max_negatives + 10, size)
    primes = _primes_above(size, 61)
    h1 = F.xxhash64(seed, F.lit("start"), F.col("query_id"))
    h2 = F.xxhash64(seed, F.lit("stride"), F.col("query_id"))
    stride = F.element_at(F.array(*[F.lit(p) for p in primes]), (F.pmod(h2, F.lit(len(primes))) + 1).cast("int")).cast("long")
    walk = (query_ids.select("query_id").distinct()
                     .select("query_id", F.pmod(h1, F.lit(size)).alias("_start"), stride.alias("_stride"),
                             F.explode(F.sequence(F.lit(0), F.lit(m - 1))).alias("_k")))
    walk = walk.select("query_id", F.col("_k").cast("double").alias("_priority"),
                       F.pmod(F.col("_start") + F.col("_k").cast("long") * F.col("_stride"), F.lit(size)).alias("_idx"))
    pairs = walk.join(pool, on="_idx").drop("_idx")
    # Only returned pairs of pool products can collide: the anti-join hashes those, not every returned pair.
    returned = returned.join(pool.select("product_id"), on="product_id", how="left_semi")
    return pairs.join(returned, on=["query_id", "product_id"], how="left_anti")


# ---- 7. precedence, caps, output ------------------------------------------------------------------

CHANNEL_COLUMNS = [f"{kind}_{ch}" for ch in CHANNELS for kind in ("rank", "score")]
RANK_COLUMNS = CHANNEL_COLUMNS + ["n_channels", "best_rank", "worst_rank", "rank_spread"]


def _with_null_channel_columns(df: DataFrame) -> DataFrame:
    """A pair no channel returned (classes 4-5): null ranks and scores."""
    return df.select("*", *[F.lit(None).cast("double" if c.startswith("score_") else "int").alias(c)
                            for c in CHANNEL_COLUMNS])


def apply_caps(candidates: DataFrame, rules: MiningRules) -> DataFrame:
    """Per query, at most max_positives positives and max_negatives negatives, deterministically.

    Within a class, candidates are ordered by `_priority` then product_id (class_rank). Each
    class's first `quota` rows are taken first, interleaved across classes by class_rank (so all
    classes are represented even when quotas add up to more than the cap); then the rest fill the
    polarity's remaining room in the same order. Ties always break on product_id.
    candidates: query_id, product_id, `level` (the class), `_priority`. The windows partition on
    the integer level and a boolean polarity rather than names, and the second needs no
    product_id: (class_rank, level) is unique there.
    """
    quota = F.lit(None).cast("int")
    for cls, lvl in CLASSES.items():
        quota = F.when(F.col("level") == lvl, F.lit(rules.quota(cls))).otherwise(quota)
    positive = F.col("level").isin(*POSITIVE_LEVELS)
    cap = F.when(positive, F.lit(rules.max_positives)).otherwise(F.lit(rules.max_negatives))
    w_cls = Window.partitionBy("query_id", "level").orderBy(F.col("_priority").asc(), F.col("product_id").asc())
    df = candidates.withColumn("_class_rank", F.row_number().over(w_cls)).withColumn("_quota", quota)
    # No class can place more rows than its polarity's cap: cut before the second window.
    df = df.where(F.col("_class_rank") <= cap)
    w_pol = Window.partitionBy("query_id", positive).orderBy(
        (F.col("_class_rank") > F.col("_quota")).asc(), F.col("_class_rank").asc(), F.col("level").asc())
    df = df.withColumn("_pol_rank", F.row_number().over(w_pol))
    return df.where(F.col("_pol_rank") <= cap).drop("_class_rank", "_quota", "_pol_rank")


POSITIVE_LEVELS = [CLASSES[c] for c in POSITIVE_CLASSES]


def _level_of(cls: Column) -> Column:
    level = F.lit(None).cast("int")
    for name, lvl in CLASSES.items():
        level = F.when(cls == name, F.lit(lvl)).otherwise(level)
    return level.cast("int")


def _class_of(level: Column) -> Column:
    name = F.lit(None).cast("string")
    for cls, lvl in CLASSES.items():
        name = F.when(level == lvl, F.lit(cls)).otherwise(name)
    return name


OUTPUT_COLUMNS = ["query_id", "query", "product_id", *RANK_COLUMNS, "token_similarity", "candidate_class", "level",
                  "polarity", "segment", "mined_at"]


def mine_candidates(logs: DataFrame, products: DataFrame, queries: DataFrame, rules: MiningRules, *,
                    n_products: int | None = None, run_ids: list[str] | None = None,
                    checkpoint: Callable[[DataFrame, str], DataFrame] | None = None) -> DataFrame:
    """Selected, deduplicated log rows (see `split_logs`) + catalog + queries -> mined_candidates rows.

    logs: retrieval_logs rows already validated. products: product_id, text. queries: query_id,
    query, segment. `n_products` (the catalog size, for IDF and the df cap) is counted when omitted.
    `checkpoint(df, name) -> df` may materialise the intermediates used by several branches (the
    pivot's cells and its repeated pairs, the mined queries, the term tables, the token-similar pairs,
    the random pool): Spark Connect engines without caching (Sail) would otherwise recompute them once per branch.
    The job passes one that writes Parquet; the default is none. Only the pivot and the catalog's
    term table are large (the latter holds only the queries' terms, see `tfidf_tables`).
    """
    checkpoint = checkpoint or _no_checkpoint
    if n_products is None:
        n_products = products.count()
    selected = select_runs(logs, run_ids)
    if rules.max_rank is not None:
        selected = selected.where(F.col("rank") <= rules.max_rank)
    q_info = queries.select("query_id", F.col("query").alias("_qtext"), "segment")
    mined_queries = (logged_query_texts(selected).join(q_info, on="query_id", how="left")
                            .select("query_id", F.coalesce("_qtext", "_lq").alias("query"), "segment"))
    # The pivot and the term tables do not depend on each other: materialised at once, each fills the
    # cores the other leaves idle (its scans, shuffles and writes).
    with ThreadPoolExecutor(max_workers=1) as beside:
        pivot_job = beside.submit(pivot_channels, selected, checkpoint)
        mined_queries = checkpoint(mined_queries, "queries")
        product_terms, query_terms = tfidf_tables(products.select("product_id", "text"), mined_queries, n_products,
                                                  checkpoint)
        pivoted = pivot_job.result()
    returned = pivoted.select("query_id", "product_id")

    channel = classify_channel_candidates(with_rank_metadata(pivoted), rules)
    channel = channel.where(F.col("candidate_class").isNotNull()).select(
        "query_id", "product_id", *CHANNEL_COLUMNS, _level_of(F.col("candidate_class")).alias("level"), "_priority")
    channel = score_pairs(channel, product_terms, query_terms)

    token = token_similar_pairs(product_terms, query_terms, returned, rules, n_products)
    token = token.withColumn("level", F.lit(CLASSES[TOKEN_SIMILAR_NEGATIVE])).withColumn(
        "_priority", (-F.col("token_similarity")).cast("double"))
    token = checkpoint(token, "token_similar")

    # Rule 4 before rule 5: a sampled pair already in the token band is not a random negative.
    rand = random_negative_pairs(mined_queries, products, returned, rules, n_products, checkpoint)
    rand = rand.join(token.select("query_id", "product_id"), on=["query_id", "product_id"], how="left_anti")
    rand = score_pairs(rand, product_terms, query_terms)
    rand = rand.where(F.col("token_similarity") < rules.random_max_similarity).withColumn("level", F.lit(CLASSES[RANDOM_NEGATIVE]))
    return _capped_output(channel, token, rand, mined_queries, rules)


def _capped_output(channel: DataFrame, token: DataFrame, rand: DataFrame, mined_queries: DataFrame,
                   rules: MiningRules) -> DataFrame:
    """The classes' candidates, capped, as mined_candidates rows. The union carries the class as its integer
    level and the channels' ranks and scores alone (narrow rows through the caps' sorts); the class names,
    the rank metadata and the query text come after the caps."""
    cols = ["query_id", "product_id", *CHANNEL_COLUMNS, "token_similarity", "level", "_priority"]
    union = (channel.select(*cols).unionByName(_with_null_channel_columns(token).select(*cols))
             .unionByName(_with_null_channel_columns(rand).select(*cols)))
    # Classes 1-3 come from pairs some channel returned, 4-5 from pairs none did (anti-joins above),
    # and 5 excludes 4: each (query, product) has exactly one class.
    capped = with_rank_metadata(apply_caps(union, rules))
    capped = capped.withColumn("candidate_class", _class_of(F.col("level"))).withColumn(
        "polarity", F.when(F.col("level").isin(*POSITIVE_LEVELS), F.lit("positive")).otherwise(F.lit("negative")))
    out = capped.join(mined_queries, on="query_id", how="left").withColumn("mined_at", F.current_timestamp())
    return out.select(*[F.col(c) for c in OUTPUT_COLUMNS])


# ---- report ---------------------------------------------------------------------------------------

REPORT_COLUMNS = ["dimension", "value", "candidate_class", "level", "n_candidates", "n_queries"]


def mining_report(mined: DataFrame) -> DataFrame:
    """Counts per class, per channel (which channels found the class's candidates), per segment.

    Rows: dimension ('class' | 'channel' | 'segment'), value ('all', a channel, a segment or
    'none'), candidate_class, level, n_candidates, n_queries (queries with >= 1 such candidate).
    """
    base = mined.select("query_id", "candidate_class", "level", "segment", *[f"rank_{ch}" for ch in CHANNELS])
    agg = [F.count(F.lit(1)).cast("long").alias("n_candidates"), F.countDistinct("query_id").cast("long").alias("n_queries")]
    by_class = base.groupBy("candidate_class", "level").agg(*agg).withColumn("dimension", F.lit("class")).withColumn("value", F.lit("all"))
    chan = base.select("query_id", "candidate_class", "level", F.explode(F.array(*[
        F.when(F.col(f"rank_{ch}").isNotNull(), F.lit(ch)) for ch in CHANNELS])).alias("value")).where(F.col("value").isNotNull())
    by_channel = chan.groupBy("value", "candidate_class", "level").agg(*agg).withColumn("dimension", F.lit("channel"))
    by_segment = (base.withColumn("value", F.coalesce(F.col("segment"), F.lit("none")))
                      .groupBy("value", "candidate_class", "level").agg(*agg).withColumn("dimension", F.lit("segment")))
    return (by_class.select(*REPORT_COLUMNS).unionByName(by_channel.select(*REPORT_COLUMNS))
            .unionByName(by_segment.select(*REPORT_COLUMNS)))


# The channels that found a mined candidate, as sql/00_views.sql spells it ('lexical+bm25'): the
# CASE list inside `filter(array(...), c -> c IS NOT NULL)` is generated from vocabulary.CHANNELS.
_FOUND_BY = re.compile(r"(filter\(array\()(.*?)(\), c -> c IS NOT NULL\))", re.S)


def found_by_sql(alias: str = "m", indent: str = " " * 11) -> str:
    """One CASE per channel, in canonical order: the channel's name when it ranked the candidate."""
    return ",".join(f"\n{indent}CASE WHEN {alias}.rank_{ch} IS NOT NULL THEN '{ch}' END" for ch in CHANNELS)


def render_views_sql(text: str) -> str:
    """The views file `text` with its channel list regenerated (unchanged when current)."""
    if len(_FOUND_BY.findall(text)) != 1:
        raise ValueError("expected exactly one `filter(array(...), c -> c IS NOT NULL)` channel list in the views file")
    return _FOUND_BY.sub(lambda m: m.group(1) + found_by_sql() + m.group(3), text)


def sync_views_sql(path: str | Path | None = None) -> bool:
    """Regenerate the channel list of sql/00_views.sql in place; True when the file changed.

        python -c "from annomine.mining import sync_views_sql; sync_views_sql()"
    """
    from annomine.sql_runner import VIEWS_FILE, default_sql_dir

    path = Path(path) if path else default_sql_dir() / VIEWS_FILE
    text = path.read_text(encoding="utf-8")
    new = render_views_sql(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def format_report(rows: list[dict]) -> str:
    """Plain-text table of `mining_report` rows (already collected)."""
    order = {d: i for i, d in enumerate(("class", "channel", "segment"))}
    rows = sorted(rows, key=lambda r: (order.get(r["dimension"], 9), str(r["value"]), r["level"] or 0))
    lines = [f"{'dimension':<9} {'value':<8} {'lvl':>3} {'class':<24} {'candidates':>10} {'queries':>8}"]
    for r in rows:
        lines.append(f"{r['dimension']:<9} {str(r['value']):<8} {r['level'] or 0:>3} {r['candidate_class']:<24} "
                     f"{r['n_candidates']:>10,} {r['n_queries']:>8,}")
    return "\n".join(lines)


def report_chart(rows: list[dict], path: str, title: str = "mined candidates") -> str:
    """A PNG: candidates per class (left) and per segment x class (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(CLASSES)
    colours = ["#2e7d32", "#81c784", "#e53935", "#fb8c00", "#9e9e9e"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    by_class = {r["candidate_class"]: r["n_candidates"] for r in rows if r["dimension"] == "class"}
    axes[0].bar(range(len(classes)), [by_class.get(c, 0) for c in classes], color=colours)
    axes[0].set_xticks(range(len(classes)), [f"L{CLASSES[c]}\n{c.replace('_', chr(10))}" for c in classes], fontsize=7)
    axes[0].set_title("per class")
    for ax, dim in ((axes[1], "channel"), (axes[2], "segment")):
        values = sorted({r["value"] for r in rows if r["dimension"] == dim})
        bottom = [0] * len(values)
        for cls, colour in zip(classes, colours):
            counts = {r["value"]: r["n_candidates"] for r in rows if r["dimension"] == dim and r["candidate_class"] == cls}
            heights = [counts.get(v, 0) for v in values]
            ax.bar(values, heights, bottom=bottom, color=colour, label=cls)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"per {dim} (stacked by class)")
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
