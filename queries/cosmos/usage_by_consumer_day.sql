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
    -- already in outputTokens: billed as output, never sent
    SUM(c.usage.reasoningTokens) AS reasoningTokens,
    SUM(c.usage.totalTokens) AS totalTokens,
    -- whole nano-units: integer-valued doubles sum exactly (below 2^53, $9M); divide by 1e9
    SUM(ROUND(c.cost.total * 1000000000)) AS costNanos,
    -- tokens used by a model the price table lacks: no cost, counted apart (not as $0)
    SUM(c.unpriced = true ? 1 : 0) AS unpricedRequests
FROM c
WHERE c.time >= @from AND c.time < @to
GROUP BY c.consumer.id, c.deployment, c.model, LEFT(c.time, 10)
