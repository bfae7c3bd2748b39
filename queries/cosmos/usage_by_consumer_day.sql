-- Tokens, cost and requests per consumer, deployment, model and day in [@from, @to).
-- @from / @to: ISO 8601 UTC strings, e.g. "2026-11-01T00:00:00Z".
SELECT
    c.consumer.id AS consumer,
    c.deployment,
    c.model,
    LEFT(c.time, 10) AS day,
    COUNT(1) AS requests,
    SUM(c.usage.inputTokens) AS inputTokens,
    SUM(c.usage.cachedInputTokens) AS cachedInputTokens,
    SUM(c.usage.outputTokens) AS outputTokens,
    SUM(c.usage.totalTokens) AS totalTokens,
    SUM(c.cost.total) AS cost
FROM c
WHERE c.time >= @from AND c.time < @to
GROUP BY c.consumer.id, c.deployment, c.model, LEFT(c.time, 10)
