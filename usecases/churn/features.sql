-- Churn's feature view: one row per account and week, what was known at the end of the week's last
-- day (feature_date) and available at the next midnight (available_at). Weeks end on the day before
-- $as_of (the clock: the day after the newest usage event); week -1 is the newest. The rows returned
-- are those available at or after $since (every week of the history when $since is before it).
-- Windows are 1, 4 and 13 weeks, so the first returned week reads 12 weeks before it.
--
-- Inside the query a week is its index idx from scan_from (idx 0 is the first returned week minus
-- 12 weeks) and an account a dense integer k: the joins hash one BIGINT key = k * 2^32 + idx, and
-- key - n is the same account n weeks earlier (no window function, no sort):
-- - usage is summed per account and week; a row's 4-week sums are its 2-week sums (the week and the
--   one before) plus those of two weeks earlier, found by key;
-- - payment failures and tickets are sparse: each counts straight into every window containing its
--   week (13 weeks for failures, 4 for tickets);
-- - the grid has a row for every account and week whose last day is on or after the signup day;
--   weeks before the signup week count in no window, nor do events of accounts not in raw_accounts;
-- - plan, seats and MRR are those in force on the week's last day, from the attribute history
--   raw_account_attributes (a row valid from day D applies from the week containing D to the week
--   of the account's next row; of several rows in one week the last wins); a week before the
--   account's first row has NULL attributes.
WITH view_bounds AS (
    SELECT origin, first_week, origin + 7 * (first_week - 12) AS scan_from, origin AS scan_to,
           -- the usage weeks read (idx 9 .. 12 - first_week - 1), in eight parts
           CAST(ceil((3 - first_week) / 8.0) AS INTEGER) AS part_weeks
    FROM (
        SELECT origin,
               CAST(greatest(-ceil((origin - first_day) / 7.0),
                             ceil((epoch(CAST($since AS TIMESTAMP)) - epoch(CAST(origin AS TIMESTAMP))) / 604800.0) - 1)
                    AS INTEGER) AS first_week
        FROM (SELECT CAST(CAST($as_of AS TIMESTAMP) AS DATE) AS origin,
                     (SELECT CAST(min(event_date) AS DATE) FROM raw_usage_events) AS first_day)
    )
),
accounts AS (
    SELECT account_id, CAST(row_number() OVER () AS BIGINT) AS k,
           -- the signup week's index, or 0 when it is before the first week read
           CAST(greatest(0, (CAST(signup_date AS DATE) - vb.scan_from) // 7) AS INTEGER) AS signup_idx,
           company_size, signup_date, segment
    FROM raw_accounts, view_bounds vb
),
attribute_spans AS (
    SELECT * FROM (
        SELECT a.k, h.idx_from, h.plan, h.seats, h.mrr,
               coalesce(lead(h.idx_from) OVER (PARTITION BY a.k ORDER BY h.valid_from), 2147483647) AS idx_to
        FROM (
            SELECT account_id, valid_from, plan, seats, mrr,
                   CAST(greatest(0, (CAST(valid_from AS DATE) - vb.scan_from) // 7) AS INTEGER) AS idx_from
            FROM raw_account_attributes, view_bounds vb
            WHERE valid_from < vb.scan_to
        ) h
        JOIN accounts a ON a.account_id = h.account_id
    )
    WHERE idx_to > idx_from AND idx_to > 13 - 1
),
-- Usage summed per account and week (BIGINT, not the HUGEINT that sum() of BIGINT gives), from the
-- start of the first returned week's 4-week window (idx 9). Eight aggregates, each over an eighth of
-- the weeks read (part_weeks each), instead of one over every account-week: each hash table holds
-- an eighth of the groups and stays in cache (measured: the one aggregate made the build 1.3x the
-- hand-written view's time, eight 1.08x; docs/BENCHMARKS.md).
usage_weekly AS (
    SELECT a.k * 4294967296 + u.idx AS key, u.active_days, u.user_days, u.sessions, u.events
    FROM (
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 0 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 1 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 1 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 2 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 2 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 3 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 3 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 4 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 4 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 5 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 5 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 6 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 6 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 7 * vb.part_weeks))
        GROUP BY ALL
        UNION ALL
        SELECT account_id, CAST((event_date - vb.scan_from) // 7 AS INTEGER) AS idx,
               count(*) AS active_days, CAST(sum(active_users) AS BIGINT) AS user_days,
               CAST(sum(sessions) AS BIGINT) AS sessions, CAST(sum(feature_events) AS BIGINT) AS events
        FROM raw_usage_events JOIN view_bounds vb
          ON event_date >= vb.scan_from + 7 * (9 + 7 * vb.part_weeks)
         AND event_date < least(vb.scan_to, vb.scan_from + 7 * (9 + 8 * vb.part_weeks))
        GROUP BY ALL
    ) u
    JOIN accounts a ON a.account_id = u.account_id AND u.idx >= a.signup_idx
),
event_windows AS (
    SELECT a.k * 4294967296 + e.idx + j AS key,
           count(*) FILTER (WHERE e.is_failure AND j < 4) AS payment_failures_28d,
           count(*) FILTER (WHERE e.is_failure) AS payment_failures_91d,
           count(*) FILTER (WHERE NOT e.is_failure) AS tickets_28d,
           count(*) FILTER (WHERE NOT e.is_failure AND e.severity >= 3) AS high_severity_tickets_28d,
           max(e.severity) AS max_ticket_severity_28d
    FROM (
        SELECT account_id, CAST((CAST(event_time AS DATE) - vb.scan_from) // 7 AS INTEGER) AS idx,
               true AS is_failure, CAST(NULL AS BIGINT) AS severity
        FROM raw_billing_events, view_bounds vb
        WHERE event_type = 'payment_failed'
          AND event_time >= vb.scan_from AND event_time < vb.scan_to
        UNION ALL
        SELECT account_id, CAST((CAST(opened_at AS DATE) - vb.scan_from) // 7 AS INTEGER) AS idx,
               false AS is_failure, severity
        FROM raw_support_tickets, view_bounds vb
        WHERE opened_at >= vb.scan_from AND opened_at < vb.scan_to
    ) e
    JOIN accounts a ON a.account_id = e.account_id AND e.idx >= a.signup_idx,
    range(13) r(j)  -- the event's week counts in the windows of the weeks idx + j
    WHERE (e.is_failure OR j < 4) AND e.idx + j >= 13 - 1
    GROUP BY ALL
),
grid AS (
    -- every week an account existed in (its last day on or after the signup day): the returned
    -- weeks and the two before them
    SELECT a.k, CAST(w.idx AS INTEGER) AS idx, a.k * 4294967296 + w.idx AS key
    FROM accounts a, view_bounds vb,
         range(13 - 3, -1 - vb.first_week + 13) w(idx)
    WHERE w.idx >= a.signup_idx
),
two_weeks AS (
    SELECT g.k, g.idx, g.key, u0.active_days, u0.events, u0.user_days,
           coalesce(u0.events, 0) + coalesce(u1.events, 0) AS events_2w,
           coalesce(u0.sessions, 0) + coalesce(u1.sessions, 0) AS sessions_2w,
           coalesce(u0.user_days, 0) + coalesce(u1.user_days, 0) AS user_days_2w
    FROM grid g
    LEFT JOIN usage_weekly u0 ON u0.key = g.key
    LEFT JOIN usage_weekly u1 ON u1.key = g.key - 1
),
windowed AS (
    SELECT t.k, t.idx, CAST(t.idx + vb.first_week - (13 - 1) AS INTEGER) AS week,
           coalesce(t.active_days, 0) AS active_days_7d, coalesce(t.events, 0) AS events_7d,
           coalesce(t.user_days, 0) AS user_days_7d,
           t.events_2w + coalesce(p.events_2w, 0) AS events_28d,
           t.sessions_2w + coalesce(p.sessions_2w, 0) AS sessions_28d,
           t.user_days_2w + coalesce(p.user_days_2w, 0) AS user_days_28d,
           coalesce(e.payment_failures_28d, 0) AS payment_failures_28d,
           coalesce(e.payment_failures_91d, 0) AS payment_failures_91d,
           coalesce(e.tickets_28d, 0) AS tickets_28d,
           coalesce(e.high_severity_tickets_28d, 0) AS high_severity_tickets_28d,
           coalesce(e.max_ticket_severity_28d, 0) AS max_ticket_severity_28d
    FROM two_weeks t CROSS JOIN view_bounds vb
    LEFT JOIN two_weeks p ON p.key = t.key - 2
    LEFT JOIN event_windows e ON e.key = t.key
    WHERE t.idx >= 13 - 1
)
SELECT a.account_id,
       w.week AS feature_week,
       vb.origin + CAST(7 * w.week + 6 AS INTEGER) AS feature_date,
       CAST(vb.origin + CAST(7 * (w.week + 1) AS INTEGER) AS TIMESTAMP) AS available_at,
       CAST(w.active_days_7d AS DOUBLE) AS active_days_7d,
       CAST(w.events_7d AS DOUBLE) AS events_7d,
       CAST(w.events_28d AS DOUBLE) AS events_28d,
       CASE WHEN w.events_28d > 0 THEN w.events_7d / (w.events_28d / 4.0) ELSE 0.0 END AS usage_trend_7d_vs_28d,
       CAST(w.sessions_28d AS DOUBLE) AS sessions_28d,
       w.user_days_7d / 7.0 AS avg_active_users_7d,
       w.user_days_28d / 28.0 AS avg_active_users_28d,
       w.user_days_7d / 7.0 / s.seats AS seat_utilisation_7d,
       CAST(s.seats AS DOUBLE) AS seats,
       s.mrr,
       CAST(a.company_size AS DOUBLE) AS company_size,
       CAST(date_diff('day', CAST(a.signup_date AS DATE), vb.origin + CAST(7 * (w.week + 1) AS INTEGER)) AS DOUBLE) AS tenure_days,
       CAST(w.payment_failures_28d AS DOUBLE) AS payment_failures_28d,
       CAST(w.payment_failures_91d AS DOUBLE) AS payment_failures_91d,
       CAST(w.tickets_28d AS DOUBLE) AS tickets_28d,
       CAST(w.high_severity_tickets_28d AS DOUBLE) AS high_severity_tickets_28d,
       CAST(w.max_ticket_severity_28d AS DOUBLE) AS max_ticket_severity_28d,
       s.plan,
       a.segment
FROM windowed w JOIN accounts a USING (k) CROSS JOIN view_bounds vb
LEFT JOIN attribute_spans s ON s.k = w.k AND w.idx >= s.idx_from AND w.idx < s.idx_to
