-- One label per live account at every week boundary (the midnights $as_of - 7k, where the feature
-- rows become available) with 35 days of usage history before it: churned = the account's churn
-- falls in the $horizon_days days from the prediction time, as known at $as_of (a churn not seen by
-- then is a provisional negative). The platform keeps a label once its window has closed (training)
-- or, in a decay episode, once observed label.early_after_days (early labels). Accounts that churned
-- before the prediction time, or signed up on or after it, have no label.
WITH bounds AS (
    SELECT CAST(min(event_date) AS DATE) AS first_day, CAST(CAST($as_of AS TIMESTAMP) AS DATE) AS origin
    FROM raw_usage_events
),
prediction_dates AS (
    SELECT CAST(origin - CAST(7 * k AS INTEGER) AS TIMESTAMP) AS prediction_time
    FROM bounds, range(1, 1000) t(k)
    WHERE origin - CAST(7 * k AS INTEGER) >= first_day + 35
)
SELECT a.account_id, p.prediction_time,
       CAST(c.churned_at IS NOT NULL
            AND c.churned_at < p.prediction_time + to_days(CAST($horizon_days AS INTEGER))
            AND c.churned_at < CAST($as_of AS TIMESTAMP) AS INTEGER) AS churned
FROM prediction_dates p
JOIN raw_accounts a ON a.signup_date < p.prediction_time
LEFT JOIN raw_churn_events c USING (account_id)
WHERE c.churned_at IS NULL OR c.churned_at >= p.prediction_time
