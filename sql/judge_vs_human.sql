-- The judge cascade against human labels on the labelled pairs it graded, per deciding tier:
-- exact agreement, agreement within one grade and mean absolute error.
SELECT deciding_tier,
       count(*) AS n_pairs,
       round(100.0 * avg(CASE WHEN grade = human_grade THEN 1.0 ELSE 0.0 END), 1) AS pct_exact,
       round(100.0 * avg(CASE WHEN abs(grade - human_grade) <= 1 THEN 1.0 ELSE 0.0 END), 1) AS pct_within_one,
       round(avg(abs(grade - human_grade)), 3) AS mean_abs_error
FROM ${namespace}.v_graded_candidates
WHERE annotation_status = 'graded' AND human_grade IS NOT NULL
GROUP BY deciding_tier
ORDER BY deciding_tier;
