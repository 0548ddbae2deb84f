-- Rows refused by a job, per target table, source and reason (the raw rows are in `quarantine.raw`).
SELECT target_table, source, reason, count(*) AS n_rows, max(quarantined_at) AS last_seen
FROM ${namespace}.quarantine
GROUP BY target_table, source, reason
ORDER BY target_table, n_rows DESC, reason;
