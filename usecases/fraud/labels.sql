-- One label per settled payment (declined payments never settle, so they are never charged back):
-- is_fraud = a chargeback reported before the clock. The platform keeps a label once its 45-day
-- window has closed (every chargeback comes within 45 days of its payment). The request fields are
-- the payment's own, as the request carried them (numbers as DOUBLE: the registered model's
-- signature takes every numeric input as a double). Payments of the first 30 days are left out: their
-- accounts' 30-day history is not complete yet.
SELECT p.payment_id,
       p.paid_at AS prediction_time,
       p.account_id,
       p.amount, p.currency, p.country, p.payment_method,
       CAST(p.card_age_days AS DOUBLE) AS card_age_days,
       CAST(hour(p.paid_at) AS DOUBLE) AS hour_of_day,
       CAST(c.payment_id IS NOT NULL AS INTEGER) AS is_fraud
FROM raw_payments p
LEFT JOIN raw_chargebacks c
  ON c.payment_id = p.payment_id AND c.reported_at < CAST($as_of AS TIMESTAMP)
WHERE p.status = 'succeeded'
  AND p.paid_at >= (SELECT CAST(CAST(min(paid_at) AS DATE) + 30 AS TIMESTAMP) FROM raw_payments)
