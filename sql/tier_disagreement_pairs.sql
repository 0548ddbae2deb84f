-- The pairs the tiers disagree on most (largest grade gap first): what to read when calibrating.
SELECT t.query_id, m.query, t.product_id, p.title, m.candidate_class, t.judge_version, t.deciding_tier,
       max(t.grade) - min(t.grade) AS grade_gap,
       to_json(map_from_entries(collect_list(struct(t.tier, t.grade)))) AS grades_by_tier
FROM ${namespace}.v_tier_grades t
JOIN ${namespace}.mined_candidates m ON m.query_id = t.query_id AND m.product_id = t.product_id
LEFT JOIN ${namespace}.products p ON p.product_id = t.product_id
WHERE t.grade IS NOT NULL
GROUP BY t.query_id, m.query, t.product_id, p.title, m.candidate_class, t.judge_version, t.deciding_tier
HAVING count(*) >= 2 AND max(t.grade) > min(t.grade)
ORDER BY grade_gap DESC, t.query_id, t.product_id
LIMIT 100;
