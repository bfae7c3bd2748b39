-- Tokens and cost per model in [@from, @to) (epoch milliseconds), whoever called it: what each
-- model costs the organisation.
SELECT
    c.model,
    COUNT(1) AS requests,
    SUM(c.usage.inputTokens) AS inputTokens,
    SUM(c.usage.outputTokens) AS outputTokens,
    SUM(c.usage.totalTokens) AS totalTokens,
    -- whole nano-units, as in usage_by_consumer_day.sql
    SUM(ROUND(c.cost.total * 1000000000)) AS costNanos
FROM c
WHERE c.timeMs >= @from AND c.timeMs < @to
GROUP BY c.model
