-- Errors and throttling per deployment and status in [@from, @to) (epoch milliseconds): 429 is
-- AOAI throttling, 5xx a failing backend; requests that never completed have no status.
SELECT c.deployment, c.status, COUNT(1) AS requests
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.deployment, c.status
