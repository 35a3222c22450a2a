SELECT g.customer_id, g.prediction_time, coalesce(sum(o.amount), 0.0) AS spend_next_14d
FROM (
    SELECT c.customer_id, CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY AS prediction_time
    FROM raw_customers c, range(1, 520) t(k)
) g
LEFT JOIN raw_orders o
  ON o.customer_id = g.customer_id AND o.ordered_at >= g.prediction_time
 AND o.ordered_at < g.prediction_time + INTERVAL ($horizon_days) DAY
WHERE g.prediction_time >= (SELECT CAST(CAST(min(ordered_at) AS DATE) + 28 AS TIMESTAMP) FROM raw_orders)
GROUP BY g.customer_id, g.prediction_time
