-- Requests per deployment and status in [@from, @to); incomplete requests have no status.
SELECT c.deployment, c.status, COUNT(1) AS requests
FROM c
WHERE c.time >= @from AND c.time < @to
GROUP BY c.deployment, c.status
