//! `tollgate report`: tokens, cost and requests by consumer, deployment/model and day, and
//! with `--by-backend` by the backend that served them.

use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use tollgate_records::Money;
use tollgate_store::{RecordQuery, RequestStore, UsageRow};

use crate::output::say;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Serialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Totals {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) throttled_requests: u64,
    pub(crate) input_tokens: u64,
    pub(crate) cached_input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) reasoning_tokens: u64,
    pub(crate) estimated_requests: u64,
    pub(crate) injected_requests: u64,
    pub(crate) lower_bound_requests: u64,
    pub(crate) unknown_usage_requests: u64,
    /// Cost of the priced requests, exactly; the unpriced ones are counted apart, never as
    /// zero.
    pub(crate) cost: Money,
    pub(crate) unpriced_requests: u64,
}

/// A model that used tokens without a price, so its cost is missing from the totals.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Unpriced {
    pub(crate) model: String,
    pub(crate) requests: u64,
    pub(crate) total_tokens: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    pub(crate) from: Option<DateTime<Utc>>,
    pub(crate) to: Option<DateTime<Utc>>,
    pub(crate) rows: Vec<UsageRow>,
    /// Rows split by serving backend (otherwise each row sums its backends).
    pub(crate) by_backend: bool,
    pub(crate) totals: Totals,
    pub(crate) unpriced_models: Vec<Unpriced>,
}

/// A usage row with its cost as fixed-precision text.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CsvRow<'a> {
    consumer: &'a str,
    deployment: &'a str,
    model: &'a str,
    backend: &'a str,
    day: &'a str,
    requests: u64,
    errors: u64,
    throttled_requests: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    reasoning_tokens: u64,
    estimated_requests: u64,
    injected_requests: u64,
    lower_bound_requests: u64,
    unknown_usage_requests: u64,
    cost: String,
    unpriced_requests: u64,
}

impl<'a> From<&'a UsageRow> for CsvRow<'a> {
    fn from(r: &'a UsageRow) -> Self {
        CsvRow {
            consumer: &r.consumer,
            deployment: &r.deployment,
            model: &r.model,
            backend: &r.backend,
            day: &r.day,
            requests: r.requests,
            errors: r.errors,
            throttled_requests: r.throttled_requests,
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens,
            output_tokens: r.output_tokens,
            total_tokens: r.total_tokens,
            reasoning_tokens: r.reasoning_tokens,
            estimated_requests: r.estimated_requests,
            injected_requests: r.injected_requests,
            lower_bound_requests: r.lower_bound_requests,
            unknown_usage_requests: r.unknown_usage_requests,
            cost: r.cost.to_string(),
            unpriced_requests: r.unpriced_requests,
        }
    }
}

/// Parses `30d`, `12h`, `45m` into a duration.
pub(crate) fn parse_since(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n
        .parse()
        .with_context(|| format!("`{s}` is not like 30d, 12h or 45m"))?;
    let span = match unit {
        "d" => Duration::try_days(n),
        "h" => Duration::try_hours(n),
        "m" => Duration::try_minutes(n),
        _ => bail!("`{s}` is not like 30d, 12h or 45m"),
    };
    span.with_context(|| format!("`{s}` is too long a span"))
}

/// Parses an RFC 3339 time or a `YYYY-MM-DD` day (its midnight UTC).
pub(crate) fn parse_time(s: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("`{s}` is neither RFC 3339 nor YYYY-MM-DD"))?;
    Ok(day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
}

/// Adds `r`'s figures into `into`.
fn add(into: &mut UsageRow, r: &UsageRow) {
    into.requests += r.requests;
    into.errors += r.errors;
    into.throttled_requests += r.throttled_requests;
    into.input_tokens += r.input_tokens;
    into.cached_input_tokens += r.cached_input_tokens;
    into.output_tokens += r.output_tokens;
    into.total_tokens += r.total_tokens;
    into.reasoning_tokens += r.reasoning_tokens;
    into.estimated_requests += r.estimated_requests;
    into.injected_requests += r.injected_requests;
    into.lower_bound_requests += r.lower_bound_requests;
    into.unknown_usage_requests += r.unknown_usage_requests;
    into.cost += r.cost;
    into.unpriced_requests += r.unpriced_requests;
}

/// The store's rows (one per serving backend) summed over backends, in the same order.
fn merge_backends(rows: Vec<UsageRow>) -> Vec<UsageRow> {
    let mut merged: Vec<UsageRow> = Vec::with_capacity(rows.len());
    for r in rows {
        // The store orders by day, consumer, deployment, model, backend: a group's backends
        // are adjacent.
        match merged.last_mut() {
            Some(last)
                if (&last.day, &last.consumer, &last.deployment, &last.model)
                    == (&r.day, &r.consumer, &r.deployment, &r.model) =>
            {
                add(last, &r);
            }
            _ => merged.push(UsageRow {
                backend: String::new(),
                ..r
            }),
        }
    }
    merged
}

pub(crate) async fn build(
    store: Arc<dyn RequestStore>,
    query: RecordQuery,
    by_backend: bool,
) -> anyhow::Result<Report> {
    let rows = store.usage(&query).await?;
    let rows = if by_backend {
        rows
    } else {
        merge_backends(rows)
    };
    let mut totals = Totals::default();
    for r in &rows {
        totals.requests += r.requests;
        totals.errors += r.errors;
        totals.throttled_requests += r.throttled_requests;
        totals.input_tokens += r.input_tokens;
        totals.cached_input_tokens += r.cached_input_tokens;
        totals.output_tokens += r.output_tokens;
        totals.total_tokens += r.total_tokens;
        totals.reasoning_tokens += r.reasoning_tokens;
        totals.estimated_requests += r.estimated_requests;
        totals.injected_requests += r.injected_requests;
        totals.lower_bound_requests += r.lower_bound_requests;
        totals.unknown_usage_requests += r.unknown_usage_requests;
        totals.cost += r.cost;
        totals.unpriced_requests += r.unpriced_requests;
    }
    Ok(Report {
        from: query.from,
        to: query.to,
        unpriced_models: unpriced_models(&rows),
        rows,
        by_backend,
        totals,
    })
}

/// The models with unpriced requests, by model across consumers and days. A row mixes priced
/// and unpriced requests only when a model got a price part-way (a table edit), so its tokens
/// are the row's; the requests are the unpriced ones.
fn unpriced_models(rows: &[UsageRow]) -> Vec<Unpriced> {
    let mut by_model = std::collections::BTreeMap::<&str, (u64, u64)>::new();
    for r in rows.iter().filter(|r| r.unpriced_requests > 0) {
        let e = by_model.entry(r.model.as_str()).or_default();
        e.0 += r.unpriced_requests;
        e.1 += r.total_tokens;
    }
    by_model
        .into_iter()
        .map(|(model, (requests, total_tokens))| Unpriced {
            model: if model.is_empty() {
                "(no model)".to_owned()
            } else {
                model.to_owned()
            },
            requests,
            total_tokens,
        })
        .collect()
}

pub(crate) fn print(report: &Report, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => say(&serde_json::to_string_pretty(report)?),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            for r in &report.rows {
                // Money as text with its fixed nine decimals, not as a number a reader
                // re-rounds.
                w.serialize(CsvRow::from(r))?;
            }
            say(String::from_utf8(w.into_inner()?)?.trim_end());
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            let mut header = vec!["day", "consumer", "deployment", "model"];
            if report.by_backend {
                header.push("backend");
            }
            header.extend([
                "requests",
                "errors",
                "of which 429",
                "input",
                "cached",
                "output",
                "of which reasoning",
                "total",
                "asked",
                "estimated",
                "lower bound",
                "unknown",
                "cost",
                "unpriced",
            ]);
            t.set_header(header);
            for r in &report.rows {
                let mut row = vec![
                    r.day.clone(),
                    r.consumer.clone(),
                    r.deployment.clone(),
                    r.model.clone(),
                ];
                if report.by_backend {
                    row.push(r.backend.clone());
                }
                row.extend([
                    r.requests.to_string(),
                    r.errors.to_string(),
                    r.throttled_requests.to_string(),
                    r.input_tokens.to_string(),
                    r.cached_input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    r.reasoning_tokens.to_string(),
                    r.total_tokens.to_string(),
                    r.injected_requests.to_string(),
                    r.estimated_requests.to_string(),
                    r.lower_bound_requests.to_string(),
                    r.unknown_usage_requests.to_string(),
                    r.cost.to_string(),
                    r.unpriced_requests.to_string(),
                ]);
                t.add_row(row);
            }
            let x = &report.totals;
            let mut total = vec![
                "total".to_owned(),
                String::new(),
                String::new(),
                String::new(),
            ];
            if report.by_backend {
                total.push(String::new());
            }
            total.extend([
                x.requests.to_string(),
                x.errors.to_string(),
                x.throttled_requests.to_string(),
                x.input_tokens.to_string(),
                x.cached_input_tokens.to_string(),
                x.output_tokens.to_string(),
                x.reasoning_tokens.to_string(),
                x.total_tokens.to_string(),
                x.injected_requests.to_string(),
                x.estimated_requests.to_string(),
                x.lower_bound_requests.to_string(),
                x.unknown_usage_requests.to_string(),
                x.cost.to_string(),
                x.unpriced_requests.to_string(),
            ]);
            t.add_row(total);
            say(&t.to_string());
            let counted = x.estimated_requests + x.lower_bound_requests + x.unknown_usage_requests;
            say(&format!(
                "usage: {} of {} requests billed with AOAI's own figure ({} asked for by Tollgate); {} estimated, {} lower bounds (cut answers), {} unknown",
                x.requests.saturating_sub(counted),
                x.requests,
                x.injected_requests,
                x.estimated_requests,
                x.lower_bound_requests,
                x.unknown_usage_requests
            ));
            for u in &report.unpriced_models {
                say(&format!(
                    "unpriced: {} ({} requests, {} tokens) has no entry in the price table, so its cost is not in the totals; add it to a copy of prices.toml and set parser.price_table_path",
                    u.model, u.requests, u.total_tokens
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tollgate_records::ConsolidatedRecord;

    use super::*;

    #[test]
    fn window_parsing() {
        assert_eq!(parse_since("30d").unwrap(), Duration::days(30));
        assert_eq!(parse_since("12h").unwrap(), Duration::hours(12));
        assert!(parse_since("soon").is_err());
        assert_eq!(
            parse_time("2026-11-02").unwrap().to_rfc3339(),
            "2026-11-02T00:00:00+00:00"
        );
        assert!(parse_time("2026-11-02T10:00:00Z").is_ok());
        assert!(parse_time("yesterday").is_err());
    }

    fn record(id: &str, consumer: &str, model: &str, cost: Option<i64>) -> ConsolidatedRecord {
        let mut r: ConsolidatedRecord = serde_json::from_value(serde_json::json!({
            "schemaVersion": 1, "id": id, "time": "2026-11-02T10:00:00Z",
            "consumer": {"id": consumer, "authKind": "apiKey"}, "model": model,
            "operation": "chat.completions", "path": "/", "stream": false, "status": 200,
            "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15,
                      "cachedInputTokens": 0, "source": "reported"},
            "choices": [], "clientDisconnected": false, "complete": true
        }))
        .unwrap();
        r.cost = cost.map(|nanos| tollgate_records::Cost {
            input: Money::from_nanos(nanos),
            cached_input: Money::ZERO,
            output: Money::ZERO,
            total: Money::from_nanos(nanos),
            currency: "USD".into(),
            price_table_version: "t".into(),
            price_multiplier: None,
        });
        r.unpriced = cost.is_none();
        r
    }

    /// Defect: an unpriced model's requests were summed as $0, indistinguishable from free.
    #[tokio::test]
    async fn unpriced_requests_are_counted_and_their_models_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::embedded::EmbeddedStore::open(dir.path(), 1000)
            .await
            .unwrap();
        store
            .upsert(&[
                record("a", "alice", "gpt-4o-2024-08-06", Some(500_000_000)),
                record("b", "alice", "gpt-x", None),
                record("c", "bob", "gpt-x", None),
            ])
            .await
            .unwrap();
        let report = build(Arc::new(store), RecordQuery::default(), false)
            .await
            .unwrap();
        assert_eq!(report.totals.requests, 3);
        assert_eq!(report.totals.unpriced_requests, 2);
        assert_eq!(report.totals.cost.to_string(), "0.500000000");
        assert_eq!(
            report.unpriced_models,
            vec![Unpriced {
                model: "gpt-x".into(),
                requests: 2,
                total_tokens: 30
            }]
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["unpricedModels"][0]["model"], "gpt-x");
        assert_eq!(json["totals"]["unpricedRequests"], 2);
    }

    /// A pool's two backends: one row per backend with `--by-backend`, one summed row
    /// without; the totals are the same either way.
    #[tokio::test]
    async fn rows_split_by_serving_backend_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            tollgate_store::embedded::EmbeddedStore::open(dir.path(), 1000)
                .await
                .unwrap(),
        );
        let mut records = Vec::new();
        for (id, backend) in [("p1", "ptu"), ("p2", "ptu"), ("g1", "paygo")] {
            let mut r = record(id, "alice", "gpt-4o-2024-08-06", Some(100));
            r.backend = Some(backend.into());
            records.push(r);
        }
        store.upsert(&records).await.unwrap();
        let split = build(store.clone(), RecordQuery::default(), true)
            .await
            .unwrap();
        let by: Vec<(&str, u64)> = split
            .rows
            .iter()
            .map(|r| (r.backend.as_str(), r.requests))
            .collect();
        assert_eq!(by, [("paygo", 1), ("ptu", 2)]);
        let merged = build(store, RecordQuery::default(), false).await.unwrap();
        assert_eq!(merged.rows.len(), 1);
        assert_eq!(merged.rows[0].requests, 3);
        assert_eq!(merged.rows[0].cost, Money::from_nanos(300));
        assert_eq!(merged.totals, split.totals);
    }
}
