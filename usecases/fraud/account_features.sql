-- One feature row per account and day: available_at is a midnight, and the row aggregates the
-- account's payments strictly before it (the last 1, 7 and 30 days). A payment at time t is scored
-- with the row of the midnight before t, as the online snapshot (refreshed daily) would serve it.
WITH bounds AS (
    SELECT greatest(CAST(CAST(min(paid_at) AS DATE) + 1 AS TIMESTAMP),
                    CAST(CAST(CAST($since AS TIMESTAMP) AS DATE) AS TIMESTAMP)) AS lo
    FROM raw_payments
),
grid AS (
    SELECT a.account_id, a.plan, a.home_country, a.signup_date, CAST(t.generate_series AS TIMESTAMP) AS available_at
    FROM raw_fraud_accounts a, bounds b,
         generate_series(b.lo, CAST($as_of AS TIMESTAMP), INTERVAL 1 DAY) t
    WHERE CAST(a.signup_date AS TIMESTAMP) < CAST(t.generate_series AS TIMESTAMP)
),
agg AS (
    SELECT g.account_id, g.available_at,
           count(p.payment_id) FILTER (WHERE p.paid_at >= g.available_at - INTERVAL 1 DAY) AS n_1d,
           count(p.payment_id) FILTER (WHERE p.paid_at >= g.available_at - INTERVAL 7 DAY) AS n_7d,
           count(p.payment_id) AS n_30d,
           sum(p.amount) FILTER (WHERE p.status = 'succeeded' AND p.paid_at >= g.available_at - INTERVAL 1 DAY) AS s_1d,
           sum(p.amount) FILTER (WHERE p.status = 'succeeded' AND p.paid_at >= g.available_at - INTERVAL 7 DAY) AS s_7d,
           sum(p.amount) FILTER (WHERE p.status = 'succeeded') AS s_30d,
           avg(p.amount) FILTER (WHERE p.status = 'succeeded') AS avg_30d,
           max(p.amount) FILTER (WHERE p.status = 'succeeded') AS max_30d,
           count(p.payment_id) FILTER (WHERE p.status = 'failed' AND p.paid_at >= g.available_at - INTERVAL 7 DAY) AS f_7d,
           count(p.payment_id) FILTER (WHERE p.status = 'failed') AS f_30d,
           count(DISTINCT p.country) FILTER (WHERE p.paid_at >= g.available_at - INTERVAL 7 DAY) AS c_7d,
           count(DISTINCT p.country) AS c_30d,
           count(DISTINCT p.instrument_id) FILTER (WHERE p.paid_at >= g.available_at - INTERVAL 7 DAY) AS i_7d,
           count(DISTINCT p.instrument_id) AS i_30d,
           count(p.payment_id) FILTER (WHERE p.country <> g.home_country) AS foreign_30d,
           max(p.paid_at) AS last_paid_at
    FROM grid g
    LEFT JOIN raw_payments p
      ON p.account_id = g.account_id AND p.paid_at < g.available_at
     AND p.paid_at >= g.available_at - INTERVAL 30 DAY
    GROUP BY g.account_id, g.available_at
)
SELECT g.account_id, g.available_at,
       CAST(a.n_1d AS DOUBLE) AS payments_1d,
       CAST(a.n_7d AS DOUBLE) AS payments_7d,
       CAST(a.n_30d AS DOUBLE) AS payments_30d,
       coalesce(a.s_1d, 0.0) AS spend_1d,
       coalesce(a.s_7d, 0.0) AS spend_7d,
       coalesce(a.s_30d, 0.0) AS spend_30d,
       a.avg_30d AS avg_amount_30d,
       a.max_30d AS max_amount_30d,
       CASE WHEN a.n_7d > 0 THEN a.f_7d / a.n_7d ELSE 0.0 END AS failed_share_7d,
       CASE WHEN a.n_30d > 0 THEN a.f_30d / a.n_30d ELSE 0.0 END AS failed_share_30d,
       CAST(a.c_7d AS DOUBLE) AS countries_7d,
       CAST(a.c_30d AS DOUBLE) AS countries_30d,
       CAST(a.i_7d AS DOUBLE) AS instruments_7d,
       CAST(a.i_30d AS DOUBLE) AS instruments_30d,
       CASE WHEN a.n_30d > 0 THEN a.foreign_30d / a.n_30d ELSE 0.0 END AS foreign_share_30d,
       (epoch(g.available_at) - epoch(a.last_paid_at)) / 86400.0 AS days_since_last_payment,
       CAST(date_diff('day', CAST(g.signup_date AS TIMESTAMP), g.available_at) AS DOUBLE) AS tenure_days,
       g.plan, g.home_country
FROM grid g
JOIN agg a ON a.account_id = g.account_id AND a.available_at = g.available_at
