-- The @n requests that used the most tokens in [@from, @to) (epoch milliseconds): who sent them,
-- to what, and what they cost. Open one with request_by_id.sql.
SELECT TOP @n
    c.id,
    c.time,
    c.consumer.id AS consumer,
    c.deployment,
    c.model,
    c.usage.totalTokens AS totalTokens,
    c.cost.total AS cost
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
ORDER BY c.usage.totalTokens DESC
