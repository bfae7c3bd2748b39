-- How exact the usage figures are per deployment in [@from, @to) (epoch milliseconds): AOAI's
-- own figure (and how many Tollgate asked for), estimated, lower bounds (cut answers), unknown;
-- streams and client disconnects. Filter on c.usageQuality.quality and read
-- c.usageQuality.reason for the requests.
SELECT
    c.deployment,
    COUNT(1) AS requests,
    SUM(c.usageQuality.quality IN ("reported", "reportedAfterInjection") ? 1 : 0) AS reported,
    SUM(c.usageQuality.quality = "reportedAfterInjection" ? 1 : 0) AS askedByTollgate,
    SUM(c.usageQuality.quality = "estimated" ? 1 : 0) AS estimated,
    SUM(c.usageQuality.quality = "lowerBound" ? 1 : 0) AS lowerBound,
    SUM(c.usageQuality.quality = "unknown" ? 1 : 0) AS unknown,
    SUM(c.stream ? 1 : 0) AS streams,
    SUM(c.clientDisconnected ? 1 : 0) AS disconnected
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.deployment
