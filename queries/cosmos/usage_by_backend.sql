-- Requests, tokens, cost and errors per deployment and serving backend in [@from, @to) (epoch
-- milliseconds): how a pool's traffic split between PTU and pay-as-you-go, and which backend
-- failed or throttled. `attempts` counts every backend tried, retries included; a request
-- Tollgate answered itself (refused, every backend resting) has no backend.
SELECT
    c.deployment,
    c.backend,
    COUNT(1) AS requests,
    SUM(ARRAY_LENGTH(c.attempts)) AS attempts,
    SUM(c.status >= 400 ? 1 : 0) AS errors,
    SUM(c.usage.totalTokens) AS totalTokens,
    -- whole nano-units, as in usage_by_consumer_day.sql
    SUM(ROUND(c.cost.total * 1000000000)) AS costNanos
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.deployment, c.backend
