-- Grade distribution per channel combination: for candidates retrieved by each combination of
-- channels ('lexical+bm25+ann', 'ann', ... 'none'), how the judge cascade graded them, the
-- grade's share within the combination and the combination's mean grade.
SELECT channels,
       grade,
       count(*) AS n_pairs,
       round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY channels), 1) AS pct_of_channels,
       round(sum(grade * count(*)) OVER (PARTITION BY channels) / sum(count(*)) OVER (PARTITION BY channels), 2) AS mean_grade
FROM ${namespace}.v_graded_candidates
WHERE annotation_status = 'graded'
GROUP BY channels, grade
ORDER BY channels, grade;
