//! Consolidated records in the `requests` container (partition key `/id`), and the report's
//! queries over them.
//!
//! Each document is the consolidated record with two fields for queries: `timeMs` (the request
//! time as epoch milliseconds, so windows compare numbers, not timestamp strings of varying
//! precision) and `day` (UTC, `YYYY-MM-DD`). Usage is grouped here rather than with `GROUP BY`:
//! the SDK runs cross-partition queries without a gateway query plan, and the grouping must
//! match the embedded store's exactly (errors, usage quality, exact money); the query projects
//! only the fields it needs.

use std::collections::BTreeMap;

use async_trait::async_trait;
use azure_data_cosmos::{FeedScope, Query};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tollgate_records::{ConsolidatedRecord, Money, UsageQuality, UsageSource};

use super::{CosmosStore, find, param, query_all, store_error};
use crate::{RecordQuery, RequestStore, StoreError, UsageRow};

/// The consolidated record with `timeMs` and `day`, which the queries filter and group on.
fn document(r: &ConsolidatedRecord) -> Result<Box<RawValue>, StoreError> {
    super::document_with(
        r,
        &[
            ("timeMs", r.time.timestamp_millis().into()),
            ("day", r.day().into()),
        ],
    )
}

/// The `WHERE` clause and parameters of a query's filters.
fn filtered(select: &str, q: &RecordQuery) -> Result<Query, StoreError> {
    let mut clauses = vec!["true".to_owned()];
    if q.from.is_some() {
        clauses.push("c.timeMs >= @from".into());
    }
    if q.to.is_some() {
        clauses.push("c.timeMs < @to".into());
    }
    if q.consumer.is_some() {
        clauses.push("c.consumer.id = @consumer".into());
    }
    if q.deployment.is_some() {
        clauses.push("c.deployment = @deployment".into());
    }
    let mut query = Query::from(format!("{select} WHERE {}", clauses.join(" AND ")));
    if let Some(from) = q.from {
        query = param(query, "@from", from.timestamp_millis())?;
    }
    if let Some(to) = q.to {
        query = param(query, "@to", to.timestamp_millis())?;
    }
    if let Some(c) = &q.consumer {
        query = param(query, "@consumer", c)?;
    }
    if let Some(d) = &q.deployment {
        query = param(query, "@deployment", d)?;
    }
    Ok(query)
}

/// What the usage report needs of one record.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Facts {
    consumer: String,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
    #[serde(default)]
    model: Option<String>,
    day: String,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    truncated: bool,
    #[serde(default = "yes")]
    complete: bool,
    #[serde(default)]
    usage: Option<tollgate_records::Usage>,
    #[serde(default)]
    quality: Option<UsageQuality>,
    #[serde(default)]
    cost: Option<Money>,
    #[serde(default)]
    unpriced: bool,
}

fn yes() -> bool {
    true
}

const FACTS: &str = "SELECT c.consumer.id AS consumer, c.deployment, c.model, c.backend, c.day, c.status, \
     c.truncated, c.complete, c.usage, c.usageQuality.quality AS quality, c.cost.total AS cost, \
     c.unpriced FROM c";

fn add(row: &mut UsageRow, f: &Facts) {
    row.requests += 1;
    let failed = f.status.is_none_or(|s| s >= 400) || f.truncated || !f.complete;
    row.errors += u64::from(failed);
    row.throttled_requests += u64::from(f.status == Some(429));
    if let Some(u) = &f.usage {
        row.input_tokens += u.input_tokens;
        row.cached_input_tokens += u.cached_input_tokens;
        row.output_tokens += u.output_tokens;
        row.total_tokens += u.total_tokens;
        row.reasoning_tokens += u.reasoning_tokens;
    }
    let estimated = match f.quality {
        Some(q) => q == UsageQuality::Estimated,
        // Records from before usage quality: the usage's own source says.
        None => f
            .usage
            .as_ref()
            .is_some_and(|u| u.source == UsageSource::Estimated),
    };
    row.estimated_requests += u64::from(estimated);
    row.injected_requests += u64::from(f.quality == Some(UsageQuality::ReportedAfterInjection));
    row.lower_bound_requests += u64::from(f.quality == Some(UsageQuality::LowerBound));
    row.unknown_usage_requests += u64::from(f.quality == Some(UsageQuality::Unknown));
    if let Some(c) = f.cost {
        row.cost += c;
    }
    row.unpriced_requests += u64::from(f.unpriced);
}

#[async_trait]
impl RequestStore for CosmosStore {
    async fn upsert(&self, records: &[ConsolidatedRecord]) -> Result<(), StoreError> {
        let docs = records
            .iter()
            .map(|r| Ok((r.id.clone(), document(r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Named before anything is sent: Cosmos DB would answer 413 for it for ever.
        if let Some((id, doc)) = docs
            .iter()
            .find(|(_, d)| d.get().len() > super::ITEM_MAX_BYTES)
        {
            return Err(StoreError::Rejected {
                id: id.clone(),
                detail: format!(
                    "{} bytes as a document, over Cosmos DB's item limit",
                    doc.get().len()
                ),
            });
        }
        futures_util::stream::iter(docs)
            .map(|(id, doc)| async move {
                match self.requests.upsert_item(id.clone(), &id, &doc, None).await {
                    Ok(_) => Ok(()),
                    Err(e) if super::status_of(&e) == 413 => Err(StoreError::Rejected {
                        id,
                        detail: e.to_string(),
                    }),
                    Err(e) => Err(store_error(e)),
                }
            })
            .buffer_unordered(self.write_concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn get(&self, id: &str) -> Result<Option<ConsolidatedRecord>, StoreError> {
        find(&self.requests, id).await
    }

    async fn list(&self, query: &RecordQuery) -> Result<Vec<ConsolidatedRecord>, StoreError> {
        let mut records: Vec<ConsolidatedRecord> = query_all(
            &self.requests,
            filtered("SELECT * FROM c", query)?,
            FeedScope::full_container(),
        )
        .await?;
        // Newest first, sorted here: a cross-partition ORDER BY needs the query pipeline.
        records.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));
        if let Some(limit) = query.limit {
            records.truncate(limit);
        }
        Ok(records)
    }

    async fn usage(&self, query: &RecordQuery) -> Result<Vec<UsageRow>, StoreError> {
        let facts: Vec<Facts> = query_all(
            &self.requests,
            filtered(FACTS, query)?,
            FeedScope::full_container(),
        )
        .await?;
        let mut rows: BTreeMap<(String, String, String, String, String), UsageRow> =
            BTreeMap::new();
        for f in &facts {
            let deployment = f.deployment.clone().unwrap_or_default();
            let model = f.model.clone().unwrap_or_default();
            let backend = f.backend.clone().unwrap_or_default();
            // Keyed in the report's order: day, consumer, deployment, model, backend.
            let key = (
                f.day.clone(),
                f.consumer.clone(),
                deployment.clone(),
                model.clone(),
                backend.clone(),
            );
            let row = rows.entry(key).or_insert_with(|| UsageRow {
                consumer: f.consumer.clone(),
                deployment,
                model,
                backend,
                day: f.day.clone(),
                requests: 0,
                errors: 0,
                throttled_requests: 0,
                input_tokens: 0,
                cached_input_tokens: 0,
                output_tokens: 0,
                total_tokens: 0,
                reasoning_tokens: 0,
                estimated_requests: 0,
                injected_requests: 0,
                lower_bound_requests: 0,
                unknown_usage_requests: 0,
                cost: Money::ZERO,
                unpriced_requests: 0,
            });
            add(row, f);
        }
        Ok(rows.into_values().collect())
    }
}
