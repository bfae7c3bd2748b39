-- Tokens, cost and requests per consumer, deployment, model and UTC day in [@from, @to).
-- @from / @to: epoch milliseconds (c.timeMs), e.g. 1761955200000 for 2025-11-01T00:00:00Z;
-- numbers compare exactly where timestamps of varying precision would not.
SELECT
    c.consumer.id AS consumer,
    c.deployment,
    c.model,
    c.day,
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
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.consumer.id, c.deployment, c.model, c.day
