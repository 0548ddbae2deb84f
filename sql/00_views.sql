-- Curated views over annomine's tables. ${namespace} is where the tables live: `annomine` on the
-- embedded engine, `<catalog>.<schema>` on Unity Catalog (`annomine sql` substitutes it; in a SQL
-- editor replace it by hand). Re-running this file replaces the views; it never writes a table.

-- The latest annotation of each (query, product): a re-grade by a newer judge version supersedes
-- older ones. A failed attempt (grade null, error set) is kept, so failures stay visible.
-- `content_hash`: the query and product text the grade was given for (annomine/graded_content.py).
CREATE OR REPLACE VIEW ${namespace}.v_annotations_latest AS
SELECT query_id, product_id, judge_version, grade, confidence, deciding_tier, tier_outputs,
       latency_ms, prompt_tokens, completion_tokens, error, annotated_at, content_hash
FROM (
  SELECT a.*,
         row_number() OVER (PARTITION BY a.query_id, a.product_id
                            ORDER BY a.annotated_at DESC, a.judge_version DESC) AS rn
  FROM ${namespace}.annotations a
) ranked
WHERE rn = 1;

-- Every mined candidate with the channels that retrieved it ('lexical+bm25', 'ann', ...; 'none'
-- for token-similar and random negatives), its latest grade, its annotation status
-- (graded / failed / pending, or stale: graded for an earlier query or product text, so the grade
-- is not used until `annomine annotate` grades it again) and the human grade where the pair is labelled.
CREATE OR REPLACE VIEW ${namespace}.v_graded_candidates AS
SELECT m.query_id, m.query, m.product_id, m.segment, m.candidate_class, m.level, m.polarity,
       coalesce(nullif(concat_ws('+', filter(array(
           CASE WHEN m.rank_lexical IS NOT NULL THEN 'lexical' END,
           CASE WHEN m.rank_bm25 IS NOT NULL THEN 'bm25' END,
           CASE WHEN m.rank_ann IS NOT NULL THEN 'ann' END), c -> c IS NOT NULL)), ''), 'none') AS channels,  -- list generated: annomine.mining.sync_views_sql
       m.n_channels, m.best_rank, m.rank_spread, m.token_similarity,
       a.judge_version, a.grade, a.confidence, a.deciding_tier, a.error,
       CASE WHEN a.query_id IS NULL THEN 'pending'
            WHEN NOT (a.content_hash <=> sha2(concat_ws(char(31), coalesce(m.query, ''), coalesce(p.text, '')), 256))
                 THEN 'stale'
            WHEN a.error IS NOT NULL OR a.grade IS NULL THEN 'failed'
            ELSE 'graded' END AS annotation_status,
       h.grade AS human_grade
FROM ${namespace}.mined_candidates m
LEFT JOIN ${namespace}.v_annotations_latest a ON a.query_id = m.query_id AND a.product_id = m.product_id
LEFT JOIN ${namespace}.products p ON p.product_id = m.product_id
LEFT JOIN ${namespace}.human_labels h ON h.query_id = m.query_id AND h.product_id = m.product_id;

-- One row per tier that graded a pair: `tier_outputs` (a JSON object keyed by tier) exploded.
CREATE OR REPLACE VIEW ${namespace}.v_tier_grades AS
SELECT a.query_id, a.product_id, a.judge_version, a.deciding_tier, t.tier,
       t.output.grade AS grade, t.output.confidence AS confidence, t.output.error AS error
FROM ${namespace}.annotations a
LATERAL VIEW explode(from_json(a.tier_outputs,
    'map<string, struct<grade: int, confidence: double, error: string>>')) t AS tier, output;

-- The latest retrieval run of each channel (as the mine stage selects them).
CREATE OR REPLACE VIEW ${namespace}.v_retrieval_latest AS
SELECT l.*
FROM ${namespace}.retrieval_logs l
JOIN (
  SELECT channel, max_by(run_id, struct(last_logged_at, run_id)) AS run_id
  FROM (SELECT channel, run_id, max(logged_at) AS last_logged_at
        FROM ${namespace}.retrieval_logs GROUP BY channel, run_id) runs
  GROUP BY channel
) latest ON latest.channel = l.channel AND latest.run_id = l.run_id;

-- Every training row of every model variant the curriculum stage wrote, with its variant.
-- (A variant whose table does not exist is left out by `annomine sql`.)
CREATE OR REPLACE VIEW ${namespace}.v_training_sets AS
SELECT 'curriculum' AS variant, * FROM ${namespace}.train_set_curriculum
UNION ALL
SELECT 'mixed' AS variant, * FROM ${namespace}.train_set_mixed
UNION ALL
SELECT 'no_llm' AS variant, * FROM ${namespace}.train_set_no_llm
UNION ALL
SELECT 'curriculum_roar' AS variant, * FROM ${namespace}.train_set_curriculum_roar
UNION ALL
SELECT 'human' AS variant, * FROM ${namespace}.train_set_human
UNION ALL
SELECT 'human_plus_curriculum' AS variant, * FROM ${namespace}.train_set_human_plus_curriculum
UNION ALL
SELECT 'curriculum_then_human' AS variant, * FROM ${namespace}.train_set_curriculum_then_human
UNION ALL
SELECT 'curriculum_with_human' AS variant, * FROM ${namespace}.train_set_curriculum_with_human;
