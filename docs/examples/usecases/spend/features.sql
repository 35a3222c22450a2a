-- Weekly feature rows per customer: the week boundaries count back from $as_of.
WITH bounds AS (
    SELECT greatest(CAST($since AS TIMESTAMP), CAST(CAST(min(ordered_at) AS DATE) + 28 AS TIMESTAMP)) AS lo
    FROM raw_orders
),
grid AS (
    SELECT c.customer_id, c.region, CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY AS available_at
    FROM raw_customers c, range(0, 520) t(k), bounds b
    WHERE CAST($as_of AS TIMESTAMP) - INTERVAL (7 * k) DAY >= b.lo
)
SELECT g.customer_id, g.available_at,
       CAST(count(o.order_id) FILTER (WHERE o.ordered_at >= g.available_at - INTERVAL 7 DAY) AS DOUBLE) AS orders_7d,
       coalesce(sum(o.amount) FILTER (WHERE o.ordered_at >= g.available_at - INTERVAL 7 DAY), 0.0) AS spend_7d,
       CAST(count(o.order_id) AS DOUBLE) AS orders_28d,
       coalesce(sum(o.amount), 0.0) AS spend_28d,
       g.region
FROM grid g
LEFT JOIN raw_orders o
  ON o.customer_id = g.customer_id AND o.ordered_at < g.available_at
 AND o.ordered_at >= g.available_at - INTERVAL 28 DAY
GROUP BY g.customer_id, g.available_at, g.region
