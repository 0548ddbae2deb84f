-- How much the retrieval channels agree: for each pair of channels, over the queries both ran on
-- (latest run each), the mean share of one channel's results the other also returned (Jaccard).
WITH per_query AS (
  SELECT query_id, channel, collect_set(product_id) AS items
  FROM ${namespace}.v_retrieval_latest
  GROUP BY query_id, channel
)
SELECT a.channel AS channel_a,
       b.channel AS channel_b,
       count(*) AS n_queries,
       round(avg(size(array_intersect(a.items, b.items)) / size(array_union(a.items, b.items))), 3) AS mean_jaccard
FROM per_query a
JOIN per_query b ON a.query_id = b.query_id AND a.channel < b.channel
GROUP BY a.channel, b.channel
ORDER BY a.channel, b.channel;
