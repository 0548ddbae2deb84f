-- Difficulty mix per query segment: mined candidates per difficulty level (1 easy positive ..
-- 5 random negative), how many queries have one, and the level's share of the segment's candidates.
SELECT coalesce(segment, 'unsegmented') AS segment,
       level,
       candidate_class,
       count(*) AS n_candidates,
       count(DISTINCT query_id) AS n_queries,
       round(100.0 * count(*) / sum(count(*)) OVER (PARTITION BY coalesce(segment, 'unsegmented')), 1) AS pct_of_segment
FROM ${namespace}.mined_candidates
GROUP BY coalesce(segment, 'unsegmented'), level, candidate_class
ORDER BY CASE coalesce(segment, 'unsegmented') WHEN 'head' THEN 1 WHEN 'torso' THEN 2 WHEN 'tail' THEN 3 ELSE 4 END,
         level;
