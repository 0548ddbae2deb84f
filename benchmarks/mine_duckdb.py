"""The mining set logic of `annomine.mining.mine_candidates`, as DuckDB SQL: a benchmark reference only.

Same rules, same thresholds (`MiningRules` defaults, caps and max-df from the command line), over the
Parquet folder benchmarks/gen_logs.py writes; the candidates go to a Parquet file in the
mined_candidates columns. `benchmarks/bench_mine.py` runs it in a subprocess (its own peak RSS)
next to annomine's mining and compares the deterministic classes pair for pair.

Differences by design: the random negatives' pool and walk hash with DuckDB's `hash()` (not
Spark's xxhash64), so class 5 is a different sample of the same size; `first(query)` per pair and
floating sums may pick/round in another order (scores agree to ~1e-9).

    python benchmarks/mine_duckdb.py /tmp/mine/gen10m --out /tmp/mine/duck.parquet --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from annomine.mining import STOPWORDS, MiningRules, _primes_above  # noqa: E402
from annomine.vocabulary import CHANNELS, CLASS_LEVELS, POSITIVE_CLASSES  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which exec resets (ru_maxrss would start from the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _list(values) -> str:
    return ", ".join(_lit(v) for v in values)


def _terms_sql(source: str, id_col: str, text_col: str) -> str:
    """(id, term, tf): the tokeniser of `annomine.mining._terms`."""
    return f"""
        SELECT {id_col}, term, count(*) AS tf FROM (
            SELECT {id_col}, unnest(string_split_regex(lower(coalesce({text_col}, '')), '[^a-z0-9]+')) AS term FROM {source})
        WHERE length(term) >= 2 AND term NOT IN ({_list(STOPWORDS)})
        GROUP BY {id_col}, term"""


def _score_sql(keys: str) -> str:
    """(query_id, product_id, token_similarity) for the distinct pairs of `keys` (as `score_pairs`)."""
    return f"""
        SELECT k.query_id, k.product_id, least(1.0, round(coalesce(d.sim, 0.0), 9))::DOUBLE AS token_similarity
        FROM (SELECT DISTINCT query_id, product_id FROM {keys}) k
        LEFT JOIN (SELECT k2.query_id, k2.product_id, sum(q.w * p.w) AS sim
                   FROM (SELECT DISTINCT query_id, product_id FROM {keys}) k2
                   JOIN q_terms q ON q.query_id = k2.query_id
                   JOIN p_terms p ON p.product_id = k2.product_id AND p.term = q.term
                   GROUP BY k2.query_id, k2.product_id) d
          ON d.query_id = k.query_id AND d.product_id = k.product_id"""


def statements(data: Path, out: Path, rules: MiningRules, n_products: int) -> list[tuple[str, str]]:
    """(stage name, SQL) in order; temp tables hold what several later stages read."""
    rank_cols = ", ".join(f"min(rank) FILTER (WHERE channel = {_lit(ch)})::INT AS rank_{ch}, "
                          f"max(score) FILTER (WHERE channel = {_lit(ch)})::DOUBLE AS score_{ch}" for ch in CHANNELS)
    ranks = ", ".join(f"rank_{ch}" for ch in CHANNELS)
    n_ch = " + ".join(f"(rank_{ch} IS NOT NULL)::INT" for ch in CHANNELS)
    within = lambda ch, k: f"(rank_{ch} IS NOT NULL AND rank_{ch} <= {k})"  # noqa: E731
    easy = " AND ".join(within(ch, rules.easy_top_k) for ch in rules.easy_channels)
    lexical = " OR ".join(within(ch, rules.hard_positive_top_k) for ch in rules.hard_positive_channels)
    missed = " AND ".join(f"rank_{ch} IS NULL" for ch in rules.hard_positive_missed_by) or "TRUE"
    lex_best = f"least({', '.join(f'rank_{ch}' for ch in rules.hard_positive_channels)})"
    max_rank = f"AND rank <= {rules.max_rank}" if rules.max_rank is not None else ""
    max_df = rules.max_df(n_products)
    size = max(1, min(int(rules.random_pool_size), int(n_products)))
    m = min(rules.max_negatives + 10, size)
    primes = _primes_above(size, 61)
    seed = int(rules.seed)
    levels = " ".join(f"WHEN {_lit(c)} THEN {lvl}" for c, lvl in CLASS_LEVELS.items())
    quotas = " ".join(f"WHEN {_lit(c)} THEN {rules.quota(c)}" for c in CLASS_LEVELS)
    rank_out = ", ".join(f"rank_{ch}, score_{ch}" for ch in CHANNELS)
    null_ranks = ", ".join(f"NULL::INT AS rank_{ch}, NULL::DOUBLE AS score_{ch}" for ch in CHANNELS)
    return [
        ("pivot", f"""
        CREATE TEMP TABLE pivoted AS
        WITH logs AS (
            SELECT * FROM read_parquet({_lit(str(data / 'logs' / '*.parquet'))})
            WHERE nullif(trim(run_id), '') IS NOT NULL AND nullif(trim(query_id), '') IS NOT NULL
              AND nullif(trim(product_id), '') IS NOT NULL AND channel IN ({_list(CHANNELS)}) AND rank >= 1),
        latest AS (
            SELECT channel, run_id FROM (SELECT channel, run_id, max(logged_at) AS _at FROM logs GROUP BY channel, run_id)
            QUALIFY row_number() OVER (PARTITION BY channel ORDER BY _at DESC NULLS LAST, run_id DESC) = 1),
        keyed AS (
            SELECT l.*, rank::DOUBLE + 0.9 * (0.5 - atan(coalesce(score, -1e300)) / pi()) AS _key
            FROM logs l JOIN latest USING (channel, run_id) WHERE TRUE {max_rank}),
        dedup AS (
            SELECT query_id, channel, product_id, min(rank)::INT AS rank, arg_min(score, _key) AS score,
                   arg_min(query, _key) AS query
            FROM keyed GROUP BY query_id, channel, product_id),
        piv AS (
            SELECT query_id, product_id, any_value(query) AS query, {rank_cols}
            FROM dedup GROUP BY query_id, product_id)
        SELECT *, ({n_ch})::INT AS n_channels, least({ranks})::INT AS best_rank, greatest({ranks})::INT AS worst_rank,
               (greatest({ranks}) - least({ranks}))::INT AS rank_spread
        FROM piv"""),
        ("queries", f"""
        CREATE TEMP TABLE mined_queries AS
        SELECT l.query_id, coalesce(q.query, l.query) AS query, q.segment
        FROM (SELECT query_id, any_value(query) AS query FROM pivoted GROUP BY query_id) l
        LEFT JOIN read_parquet({_lit(str(data / 'queries.parquet'))}) q USING (query_id)"""),
        ("tfidf", f"""
        CREATE TEMP TABLE p_tf AS {_terms_sql(f"read_parquet({_lit(str(data / 'products.parquet'))})", 'product_id', 'text')};
        CREATE TEMP TABLE df_t AS SELECT term, count(*) AS df FROM p_tf GROUP BY term;
        CREATE TEMP TABLE p_terms AS
        WITH w AS (SELECT product_id, term, (1.0 + ln(tf::DOUBLE)) * (ln({float(n_products + 1)} / (df + 1)) + 1.0) AS w, df
                   FROM p_tf JOIN df_t USING (term))
        SELECT product_id, term, w / sqrt(sum(w * w) OVER (PARTITION BY product_id)) AS w, df FROM w;
        CREATE TEMP TABLE q_terms AS
        WITH w AS (SELECT query_id, term, (1.0 + ln(tf::DOUBLE)) * (ln({float(n_products + 1)} / (df + 1)) + 1.0) AS w, df
                   FROM ({_terms_sql('mined_queries', 'query_id', 'query')}) JOIN df_t USING (term))
        SELECT query_id, term, w / sqrt(sum(w * w) OVER (PARTITION BY query_id)) AS w, df FROM w;
        DROP TABLE p_tf"""),
        ("channel", f"""
        CREATE TEMP TABLE channel_cands AS
        WITH c AS (
            SELECT *, CASE WHEN {easy} THEN 'easy_positive' WHEN ({lexical}) AND {missed} THEN 'hard_positive'
                           WHEN n_channels = 1 AND best_rank <= {rules.hard_negative_top_k} THEN 'hard_negative' END AS candidate_class
            FROM pivoted)
        SELECT c.* EXCLUDE (query),
               (CASE candidate_class WHEN 'hard_positive' THEN {lex_best} WHEN 'easy_positive' THEN worst_rank
                     ELSE best_rank END)::DOUBLE AS _priority
        FROM c WHERE candidate_class IS NOT NULL;
        CREATE TEMP TABLE channel_scored AS
        SELECT c.*, s.token_similarity FROM channel_cands c JOIN ({_score_sql('channel_cands')}) s USING (query_id, product_id)"""),
        ("token", f"""
        CREATE TEMP TABLE blocked AS
        SELECT DISTINCT q.query_id, p.product_id
        FROM (SELECT query_id, term FROM q_terms WHERE df <= {max_df}) q
        JOIN (SELECT product_id, term FROM p_terms WHERE df <= {max_df}) p USING (term)
        ANTI JOIN pivoted r USING (query_id, product_id);
        CREATE TEMP TABLE token AS
        SELECT query_id, product_id, token_similarity, 'token_similar_negative' AS candidate_class,
               (-token_similarity)::DOUBLE AS _priority
        FROM ({_score_sql('blocked')})
        WHERE token_similarity >= {rules.token_band_low} AND token_similarity <= {rules.token_band_high};
        DROP TABLE blocked"""),
        ("random", f"""
        CREATE TEMP TABLE rand_pairs AS
        WITH pool AS (
            SELECT product_id, (row_number() OVER (ORDER BY _h, product_id) - 1)::BIGINT AS _idx FROM (
                SELECT product_id, hash({seed}, 'pool', product_id) AS _h
                FROM (SELECT DISTINCT product_id FROM read_parquet({_lit(str(data / 'products.parquet'))}))
                ORDER BY _h, product_id LIMIT {size})),
        walk AS (
            SELECT query_id, k::DOUBLE AS _priority,
                   ((hash({seed}, 'start', query_id) % {size})::BIGINT
                    + k::BIGINT * ([{', '.join(map(str, primes))}][(hash({seed}, 'stride', query_id) % {len(primes)})::INT + 1])::BIGINT)
                   % {size} AS _idx
            FROM (SELECT DISTINCT query_id FROM mined_queries), range(0, {m}) t(k))
        SELECT w.query_id, p.product_id, w._priority FROM walk w JOIN pool p USING (_idx)
        ANTI JOIN pivoted r USING (query_id, product_id)
        ANTI JOIN token t USING (query_id, product_id);
        CREATE TEMP TABLE rand AS
        SELECT r.query_id, r.product_id, s.token_similarity, 'random_negative' AS candidate_class, r._priority
        FROM rand_pairs r JOIN ({_score_sql('rand_pairs')}) s USING (query_id, product_id)
        WHERE s.token_similarity < {rules.random_max_similarity}"""),
        ("caps", f"""
        COPY (
            WITH u AS (
                SELECT query_id, product_id, {rank_out}, n_channels, best_rank, worst_rank, rank_spread, token_similarity,
                       candidate_class, _priority FROM channel_scored
                UNION ALL
                SELECT query_id, product_id, {null_ranks}, 0, NULL::INT, NULL::INT, NULL::INT, token_similarity,
                       candidate_class, _priority FROM token
                UNION ALL
                SELECT query_id, product_id, {null_ranks}, 0, NULL::INT, NULL::INT, NULL::INT, token_similarity,
                       candidate_class, _priority FROM rand),
            lv AS (
                SELECT *, (CASE candidate_class {levels} END)::INT AS level,
                       CASE WHEN candidate_class IN ({_list(POSITIVE_CLASSES)}) THEN 'positive' ELSE 'negative' END AS polarity,
                       CASE candidate_class {quotas} END AS _quota
                FROM u),
            ranked AS (
                SELECT *, row_number() OVER (PARTITION BY query_id, candidate_class ORDER BY _priority, product_id) AS _class_rank
                FROM lv),
            cut AS (
                SELECT * FROM ranked
                WHERE _class_rank <= CASE polarity WHEN 'positive' THEN {rules.max_positives} ELSE {rules.max_negatives} END),
            capped AS (
                SELECT * FROM cut
                QUALIFY row_number() OVER (PARTITION BY query_id, polarity
                                           ORDER BY _class_rank > _quota, _class_rank, level, product_id)
                        <= CASE polarity WHEN 'positive' THEN {rules.max_positives} ELSE {rules.max_negatives} END)
            SELECT c.query_id, q.query, c.product_id, {rank_out}, n_channels, best_rank, worst_rank, rank_spread,
                   token_similarity, candidate_class, level, polarity, q.segment, current_timestamp AS mined_at
            FROM capped c LEFT JOIN mined_queries q USING (query_id)
        ) TO {_lit(str(out))} (FORMAT parquet)"""),
    ]


def mine(data: Path, out: Path, rules: MiningRules, threads: int = 2, verbose: bool = False) -> dict:
    """Run every stage in one in-memory DuckDB; returns timings per stage."""
    import duckdb
    import pyarrow.parquet as pq

    n_products = pq.ParquetFile(data / "products.parquet").metadata.num_rows
    con = duckdb.connect()
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = false")
    stages = {}
    for name, sql in statements(data, out, rules, n_products):
        t = time.perf_counter()
        con.execute(sql)
        stages[name] = round(time.perf_counter() - t, 2)
        if verbose:
            print(f"[duckdb] {name}: {stages[name]}s", file=sys.stderr, flush=True)
    con.close()
    return stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder written by gen_logs.py")
    ap.add_argument("--out", required=True, help="Parquet file for the candidates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-positives", type=int, default=50)
    ap.add_argument("--max-negatives", type=int, default=50)
    ap.add_argument("--blocking-max-df", type=int, default=5000)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    rules = MiningRules(max_positives=args.max_positives, max_negatives=args.max_negatives,
                        blocking_max_df=args.blocking_max_df)
    rules.validate()
    started = time.time()
    stages = mine(Path(args.data), Path(args.out), rules, args.threads, args.verbose)
    seconds = time.time() - started
    peak = peak_rss_mib()
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(peak), "stages": stages}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
