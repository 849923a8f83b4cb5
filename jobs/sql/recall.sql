-- Recall@1/5/10 of top-10 predictions (cn_clip's evaluation.py as SQL): the share of queries
-- with a ground-truth id among their first K predictions. Tables: `truth` (query_id, targets:
-- the ids each query should find) and `predictions` (query_id, predicted: ids, best first).
-- A query without targets counts as a miss, as in cn_clip.
SELECT
  avg(CASE WHEN b.best <= 1 THEN 1.0 ELSE 0.0 END) AS r1,
  avg(CASE WHEN b.best <= 5 THEN 1.0 ELSE 0.0 END) AS r5,
  avg(CASE WHEN b.best <= 10 THEN 1.0 ELSE 0.0 END) AS r10
FROM truth t
LEFT JOIN (
  SELECT q.query_id, min(array_position(p.predicted, q.target)) AS best
  FROM (SELECT query_id, unnest(targets) AS target FROM truth) q
  JOIN predictions p ON p.query_id = q.query_id
  GROUP BY q.query_id
) b ON b.query_id = t.query_id
