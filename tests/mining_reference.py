"""A frozen copy of `annomine.mining.mine_candidates` as it was before issue 20's rework (commit 2f078d7).

tests/test_mining_equivalence.py mines the same generated log with it and with the current
`annomine.mining.mine_candidates` and compares every class pair for pair. Do not "fix" or speed up
this file: it is the reference the optimised pipeline must reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from annomine.mining import CLASSES, STOPWORDS, MiningRules
from annomine.vocabulary import (CHANNELS, EASY_POSITIVE, HARD_NEGATIVE, HARD_POSITIVE, POSITIVE_CLASSES, RANDOM_NEGATIVE,
                                 TOKEN_SIMILAR_NEGATIVE)

__all__ = ["mine_candidates"]


def select_runs(logs: DataFrame, run_ids: list[str] | None = None) -> DataFrame:
    """Rows of the configured `run_ids`, or of the latest run of each channel."""
    if run_ids:
        return logs.where(F.col("run_id").isin(*run_ids))
    runs = logs.groupBy("channel", "run_id").agg(F.max("logged_at").alias("_at"))
    w = Window.partitionBy("channel").orderBy(F.col("_at").desc_nulls_last(), F.col("run_id").desc())
    latest = runs.withColumn("_n", F.row_number().over(w)).where(F.col("_n") == 1).select("channel", "run_id")
    return logs.join(latest, on=["channel", "run_id"], how="inner")


def dedupe_logs(logs: DataFrame) -> DataFrame:
    """One row per (query, channel, product): the best rank, and among equal ranks the highest score.

    One hash aggregation with `min_by` on a numeric key, rank + 0.9 * (1/2 - atan(score)/pi): the
    fractional part orders equal ranks by descending score and never crosses to the next rank.
    (A window, or a min over a struct, is 10x slower and far hungrier on Sail.)
    """
    score = F.coalesce(F.col("score"), F.lit(-1e300))
    key = F.col("rank").cast("double") + F.lit(0.9) * (F.lit(0.5) - F.atan(score) / F.lit(math.pi))
    logs = logs.withColumn("_key", key)
    return logs.groupBy("query_id", "channel", "product_id").agg(
        F.min("rank").cast("int").alias("rank"), F.min_by("score", "_key").alias("score"),
        F.min_by("run_id", "_key").alias("run_id"), F.min_by("query", "_key").alias("query"))


# ---- 3-4. rank metadata and channel classes ---------------------------------------------------

def pivot_channels(logs: DataFrame) -> DataFrame:
    """Deduplicated logs -> one row per (query_id, product_id) with per-channel rank metadata."""
    aggs = [F.first("query", ignorenulls=True).alias("query")]
    for ch in CHANNELS:
        aggs.append(F.min(F.when(F.col("channel") == ch, F.col("rank"))).cast("int").alias(f"rank_{ch}"))
        aggs.append(F.max(F.when(F.col("channel") == ch, F.col("score"))).cast("double").alias(f"score_{ch}"))
    df = logs.groupBy("query_id", "product_id").agg(*aggs)
    ranks = [F.col(f"rank_{ch}") for ch in CHANNELS]
    n = sum((F.when(r.isNotNull(), 1).otherwise(0) for r in ranks), F.lit(0))
    return (df.withColumn("n_channels", n.cast("int"))
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


# ---- 5. token similarity with blocking -----------------------------------------------------------

def _terms(df: DataFrame, id_col: str, text_col: str) -> DataFrame:
    """(id, term, tf): lower-cased alphanumeric tokens of length >= 2, stop words removed."""
    tokens = df.select(F.col(id_col), F.explode(F.split(F.lower(F.coalesce(F.col(text_col), F.lit(""))), "[^a-z0-9]+")).alias("term"))
    tokens = tokens.where((F.length("term") >= 2) & ~F.col("term").isin(*STOPWORDS))
    return tokens.groupBy(id_col, "term").agg(F.count(F.lit(1)).alias("tf"))


def _normalise(weighted: DataFrame, id_col: str) -> DataFrame:
    norms = weighted.groupBy(id_col).agg(F.sqrt(F.sum(F.col("w") * F.col("w"))).alias("_norm"))
    return weighted.join(norms, on=id_col).select(id_col, "term", (F.col("w") / F.col("_norm")).alias("w"), "df")


def tfidf_tables(products: DataFrame, queries: DataFrame, n_products: int) -> tuple[DataFrame, DataFrame]:
    """(product_terms, query_terms): (id, term, w, df) with L2-normalised TF-IDF weights.

    products: product_id, text. queries: query_id, query. IDF comes from the catalog; query terms
    absent from the catalog are dropped (as in a vectoriser fitted on the catalog).
    """
    p_tf = _terms(products, "product_id", "text")
    df_t = p_tf.groupBy("term").agg(F.count(F.lit(1)).alias("df"))
    idf = F.log(F.lit(float(n_products + 1)) / (F.col("df") + 1)) + 1.0
    tfw = 1.0 + F.log(F.col("tf").cast("double"))
    p_w = p_tf.join(df_t, on="term").withColumn("w", tfw * idf)
    q_w = _terms(queries, "query_id", "query").join(df_t, on="term").withColumn("w", tfw * idf)
    return _normalise(p_w, "product_id"), _normalise(q_w, "query_id")


def blocked_pairs(product_terms: DataFrame, query_terms: DataFrame, max_df: int) -> DataFrame:
    """Distinct (query_id, product_id) sharing at least one term with df <= max_df."""
    q = query_terms.where(F.col("df") <= max_df).select("query_id", "term")
    p = product_terms.where(F.col("df") <= max_df).select("product_id", "term")
    return q.join(p, on="term").select("query_id", "product_id").distinct()


def score_pairs(pairs: DataFrame, product_terms: DataFrame, query_terms: DataFrame) -> DataFrame:
    """pairs + `token_similarity`: exact TF-IDF cosine over all shared terms (0.0 when none)."""
    keys = pairs.select("query_id", "product_id").distinct()
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
                          n_products: int) -> DataFrame:
    """(query_id, product_id, _priority): a seeded pseudo-random walk over a fixed product pool.

    The pool is the `random_pool_size` products with the smallest seeded hash (P of them). Each
    query visits pool positions (start + k * stride) mod P for k < m, with start and stride (a
    prime > P, so coprime with P: the m positions are distinct) hashed from (seed, query_id);
    m = max_negatives + 10 covers the pairs a channel returned (anti-joined away) and those too
    similar to the query. Queries x m rows: no query x catalog (nor x pool) cross join.
    """
    seed = F.lit(int(rules.seed))
    size = max(1, min(int(rules.random_pool_size), int(n_products)))
    pool = (products.select("product_id").distinct()
                    .withColumn("_h", F.xxhash64(seed, F.lit("pool"), F.col("product_id")))
                    .orderBy("_h", "product_id").limit(size))
    pool = pool.withColumn("_idx", (F.row_number().over(Window.partitionBy(F.lit(0)).orderBy("_h", "product_id")) - 1).cast("long")).select("product_id", "_idx")
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
    return pairs.join(returned, on=["query_id", "product_id"], how="left_anti")


# ---- 7. precedence, caps, output ------------------------------------------------------------------

RANK_COLUMNS = [f"{kind}_{ch}" for ch in CHANNELS for kind in ("rank", "score")] + [
    "n_channels", "best_rank", "worst_rank", "rank_spread"]


def _with_nulls_for_channels(df: DataFrame) -> DataFrame:
    for col in RANK_COLUMNS:
        if col not in df.columns:
            dtype = "double" if col.startswith("score_") else "int"
            df = df.withColumn(col, F.lit(0 if col == "n_channels" else None).cast(dtype))
    return df


def apply_caps(candidates: DataFrame, rules: MiningRules) -> DataFrame:
    """Per query, at most max_positives positives and max_negatives negatives, deterministically.

    Within a class, candidates are ordered by `_priority` then product_id (class_rank). Each
    class's first `quota` rows are taken first, interleaved across classes by class_rank (so all
    classes are represented even when quotas add up to more than the cap); then the rest fill the
    polarity's remaining room in the same order. Ties always break on product_id.
    """
    quota = F.lit(None).cast("int")
    for cls in CLASSES:
        quota = F.when(F.col("candidate_class") == cls, F.lit(rules.quota(cls))).otherwise(quota)
    cap = F.when(F.col("polarity") == "positive", F.lit(rules.max_positives)).otherwise(F.lit(rules.max_negatives))
    w_cls = Window.partitionBy("query_id", "candidate_class").orderBy(F.col("_priority").asc(), F.col("product_id").asc())
    df = candidates.withColumn("_class_rank", F.row_number().over(w_cls)).withColumn("_quota", quota)
    # No class can place more rows than its polarity's cap: cut before the second window.
    df = df.where(F.col("_class_rank") <= cap)
    w_pol = Window.partitionBy("query_id", "polarity").orderBy(
        (F.col("_class_rank") > F.col("_quota")).asc(), F.col("_class_rank").asc(), F.col("level").asc(), F.col("product_id").asc())
    df = df.withColumn("_pol_rank", F.row_number().over(w_pol))
    return df.where(F.col("_pol_rank") <= cap).drop("_class_rank", "_quota", "_pol_rank")


OUTPUT_COLUMNS = ["query_id", "query", "product_id", *RANK_COLUMNS, "token_similarity", "candidate_class", "level",
                  "polarity", "segment", "mined_at"]


def _no_checkpoint(df: DataFrame, name: str) -> DataFrame:
    return df


def mine_candidates(logs: DataFrame, products: DataFrame, queries: DataFrame, rules: MiningRules, *,
                    n_products: int | None = None, run_ids: list[str] | None = None,
                    checkpoint: Callable[[DataFrame, str], DataFrame] | None = None) -> DataFrame:
    """Selected, deduplicated log rows (see `split_logs`) + catalog + queries -> mined_candidates rows.

    logs: retrieval_logs rows already validated. products: product_id, text. queries: query_id,
    query, segment. `n_products` (the catalog size, for IDF and the df cap) is counted when omitted.
    `checkpoint(df, name) -> df` may materialise the intermediates used by several branches (the
    pivoted logs, the term tables): Spark Connect engines without caching (Sail) would otherwise
    recompute them once per branch. The job passes one that writes Parquet; the default is none.
    """
    checkpoint = checkpoint or _no_checkpoint
    if n_products is None:
        n_products = products.count()
    selected = select_runs(logs, run_ids)
    if rules.max_rank is not None:
        selected = selected.where(F.col("rank") <= rules.max_rank)
    selected = dedupe_logs(selected)
    pivoted = checkpoint(pivot_channels(selected), "pivoted")
    returned = pivoted.select("query_id", "product_id")

    q_info = queries.select("query_id", F.col("query").alias("_qtext"), "segment")
    mined_queries = (pivoted.groupBy("query_id").agg(F.first("query", ignorenulls=True).alias("_lq"))
                            .join(q_info, on="query_id", how="left")
                            .select("query_id", F.coalesce("_qtext", "_lq").alias("query"), "segment"))
    mined_queries = checkpoint(mined_queries, "queries")
    product_terms, query_terms = tfidf_tables(products.select("product_id", "text"), mined_queries, n_products)
    product_terms = checkpoint(product_terms, "product_terms")
    query_terms = checkpoint(query_terms, "query_terms")

    channel = classify_channel_candidates(pivoted, rules).where(F.col("candidate_class").isNotNull()).drop("query")
    channel = score_pairs(channel, product_terms, query_terms)

    token = token_similar_pairs(product_terms, query_terms, returned, rules, n_products)
    token = token.withColumn("candidate_class", F.lit(TOKEN_SIMILAR_NEGATIVE)).withColumn(
        "_priority", (-F.col("token_similarity")).cast("double"))
    token = checkpoint(token, "token_similar")

    # Rule 4 before rule 5: a sampled pair already in the token band is not a random negative.
    rand = random_negative_pairs(mined_queries, products, returned, rules, n_products)
    rand = rand.join(token.select("query_id", "product_id"), on=["query_id", "product_id"], how="left_anti")
    rand = score_pairs(rand, product_terms, query_terms)
    rand = rand.where(F.col("token_similarity") < rules.random_max_similarity).withColumn("candidate_class", F.lit(RANDOM_NEGATIVE))

    cols = ["query_id", "product_id", *RANK_COLUMNS, "token_similarity", "candidate_class", "_priority"]
    union = (_with_nulls_for_channels(channel).select(*cols)
             .unionByName(_with_nulls_for_channels(token).select(*cols))
             .unionByName(_with_nulls_for_channels(rand).select(*cols)))
    level = F.lit(None).cast("int")
    for cls, lvl in CLASSES.items():
        level = F.when(F.col("candidate_class") == cls, F.lit(lvl)).otherwise(level)
    union = union.withColumn("level", level.cast("int")).withColumn(
        "polarity", F.when(F.col("candidate_class").isin(*POSITIVE_CLASSES), F.lit("positive")).otherwise(F.lit("negative")))
    # Classes 1-3 come from pairs some channel returned, 4-5 from pairs none did (anti-joins above),
    # and 5 excludes 4: each (query, product) has exactly one class.
    capped = apply_caps(union, rules)
    out = capped.join(mined_queries, on="query_id", how="left").withColumn("mined_at", F.current_timestamp())
    return out.select(*[F.col(c) for c in OUTPUT_COLUMNS])
