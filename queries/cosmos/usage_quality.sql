-- Estimated usage, streams and client disconnects per deployment in [@from, @to).
SELECT
    c.deployment,
    COUNT(1) AS requests,
    SUM(c.usage.source = "estimated" ? 1 : 0) AS estimated,
    SUM(c.stream ? 1 : 0) AS streams,
    SUM(c.clientDisconnected ? 1 : 0) AS disconnected
FROM c
WHERE c.time >= @from AND c.time < @to
GROUP BY c.deployment
