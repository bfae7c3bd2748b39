//! `tollgate report`: tokens, cost and requests by consumer, deployment/model and day.

use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
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
    pub(crate) input_tokens: u64,
    pub(crate) cached_input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) estimated_requests: u64,
    pub(crate) cost: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    pub(crate) from: Option<DateTime<Utc>>,
    pub(crate) to: Option<DateTime<Utc>>,
    pub(crate) rows: Vec<UsageRow>,
    pub(crate) totals: Totals,
}

/// Parses `30d`, `12h`, `45m` into a duration.
pub(crate) fn parse_since(s: &str) -> anyhow::Result<Duration> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n
        .parse()
        .with_context(|| format!("`{s}` is not like 30d, 12h or 45m"))?;
    Ok(match unit {
        "d" => Duration::days(n),
        "h" => Duration::hours(n),
        "m" => Duration::minutes(n),
        _ => bail!("`{s}` is not like 30d, 12h or 45m"),
    })
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

pub(crate) async fn build(
    store: Arc<dyn RequestStore>,
    query: RecordQuery,
) -> anyhow::Result<Report> {
    let rows = store.usage(&query).await?;
    let mut totals = Totals::default();
    for r in &rows {
        totals.requests += r.requests;
        totals.errors += r.errors;
        totals.input_tokens += r.input_tokens;
        totals.cached_input_tokens += r.cached_input_tokens;
        totals.output_tokens += r.output_tokens;
        totals.total_tokens += r.total_tokens;
        totals.estimated_requests += r.estimated_requests;
        totals.cost += r.cost;
    }
    Ok(Report {
        from: query.from,
        to: query.to,
        rows,
        totals,
    })
}

pub(crate) fn print(report: &Report, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => say(&serde_json::to_string_pretty(report)?),
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            for r in &report.rows {
                w.serialize(r)?;
            }
            say(String::from_utf8(w.into_inner()?)?.trim_end());
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            t.set_header([
                "day",
                "consumer",
                "deployment",
                "model",
                "requests",
                "errors",
                "input",
                "cached",
                "output",
                "total",
                "estimated",
                "cost",
            ]);
            for r in &report.rows {
                t.add_row([
                    r.day.clone(),
                    r.consumer.clone(),
                    r.deployment.clone(),
                    r.model.clone(),
                    r.requests.to_string(),
                    r.errors.to_string(),
                    r.input_tokens.to_string(),
                    r.cached_input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    r.total_tokens.to_string(),
                    r.estimated_requests.to_string(),
                    format!("{:.6}", r.cost),
                ]);
            }
            let x = &report.totals;
            t.add_row([
                "total".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                x.requests.to_string(),
                x.errors.to_string(),
                x.input_tokens.to_string(),
                x.cached_input_tokens.to_string(),
                x.output_tokens.to_string(),
                x.total_tokens.to_string(),
                x.estimated_requests.to_string(),
                format!("{:.6}", x.cost),
            ]);
            say(&t.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
}
