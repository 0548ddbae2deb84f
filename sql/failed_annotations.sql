-- Pairs that failed annotation: the latest attempt of the judge cascade gave no grade. The error
-- says why (timeouts, unparseable answers, ...); re-running `annomine annotate` retries them.
SELECT g.query_id, g.query, g.product_id, p.title, g.candidate_class, g.level,
       g.judge_version, g.deciding_tier, g.error
FROM ${namespace}.v_graded_candidates g
LEFT JOIN ${namespace}.products p ON p.product_id = g.product_id
WHERE g.annotation_status = 'failed'
ORDER BY g.query_id, g.product_id;
