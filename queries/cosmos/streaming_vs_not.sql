-- Streaming against non-streaming requests per deployment in [@from, @to) (epoch
-- milliseconds): how many, their tokens, and their mean time to first byte and to the end.
SELECT
    c.deployment,
    c.stream,
    COUNT(1) AS requests,
    SUM(c.usage.totalTokens) AS totalTokens,
    AVG(c.latency.ttfbMs) AS meanTtfbMs,
    AVG(c.latency.totalMs) AS meanTotalMs
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.deployment, c.stream
