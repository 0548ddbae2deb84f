-- Disagreement between judge tiers: for every pair of tiers that both graded the same
-- (query, product), how often they agree exactly, within one grade, and their mean absolute gap.
SELECT a.tier AS tier_a,
       b.tier AS tier_b,
       count(*) AS n_pairs,
       sum(CASE WHEN a.grade = b.grade THEN 1 ELSE 0 END) AS n_agree,
       round(100.0 * avg(CASE WHEN a.grade = b.grade THEN 1.0 ELSE 0.0 END), 1) AS pct_agree,
       round(100.0 * avg(CASE WHEN abs(a.grade - b.grade) <= 1 THEN 1.0 ELSE 0.0 END), 1) AS pct_within_one,
       round(avg(abs(a.grade - b.grade)), 3) AS mean_abs_gap
FROM ${namespace}.v_tier_grades a
JOIN ${namespace}.v_tier_grades b
  ON a.query_id = b.query_id AND a.product_id = b.product_id AND a.judge_version = b.judge_version
 AND a.tier < b.tier
WHERE a.grade IS NOT NULL AND b.grade IS NOT NULL
GROUP BY a.tier, b.tier
ORDER BY a.tier, b.tier;
