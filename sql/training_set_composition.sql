-- Training-set composition per curriculum stage: for every model variant and stage, its loss,
-- rows and queries, and the mix of candidate classes (of the positive item) with their share.
SELECT variant,
       stage,
       stage_name,
       loss,
       coalesce(candidate_class, 'unknown') AS candidate_class,
       count(*) AS n_rows,
       count(DISTINCT query_id) AS n_queries,
       sum(CASE WHEN neg_product_id IS NOT NULL THEN 1 ELSE 0 END) AS n_with_negative,
       round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY variant, stage), 1) AS pct_of_stage
FROM ${namespace}.v_training_sets
GROUP BY variant, stage, stage_name, loss, coalesce(candidate_class, 'unknown')
ORDER BY variant, stage, candidate_class;
