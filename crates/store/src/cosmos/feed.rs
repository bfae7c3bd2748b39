//! Raw records: written in transactional batches per shard, read per shard from the change
//! feed; and the `leases` container's lease, meta and dead-letter documents.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use azure_data_cosmos::feed::ContinuationToken;
use azure_data_cosmos::options::{ChangeFeedOptions, ChangeFeedStartFrom, MaxItemCountHint};
use azure_data_cosmos::{FeedScope, Query, TransactionalBatch};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tollgate_records::RawRecord;

use super::{
    CosmosStore, Written, corrupt, find, param, query_all, status_of, store_error, write_if,
};
use crate::lease::{LeaseDoc, Versioned};
use crate::{ChangeFeed, DeadLetter, FeedPage, RawWriter, StoreError};

/// Cosmos DB's limits on one transactional batch: 100 operations and 2 MB of request. The
/// byte budget leaves room for the batch's own framing.
const BATCH_MAX_OPS: usize = 100;
const BATCH_MAX_BYTES: usize = 2_000_000;

use super::ITEM_MAX_BYTES;

/// One raw record as its Cosmos document: the record's JSON with `id` and `shard` first.
struct RawDoc {
    id: String,
    shard: String,
    doc: Box<RawValue>,
}

impl CosmosStore {
    /// The record's document; `json` is the record's JSON when the caller made it already.
    fn raw_doc(&self, record: &RawRecord, json: Option<&str>) -> Result<RawDoc, StoreError> {
        let id = record.id();
        let shard = crate::unit_of(&self.units, record.request_id()).to_owned();
        let fields = [("id", id.clone().into()), ("shard", shard.clone().into())];
        let doc = match json {
            Some(j) => super::splice(j, &fields)?,
            None => super::document_with(record, &fields)?,
        };
        Ok(RawDoc { id, shard, doc })
    }

    /// Writes one shard's documents as one atomic batch. A batch Cosmos refuses as a whole
    /// (one document already stored by an earlier, ambiguous attempt; one too large) is written
    /// item by item instead, which skips what is stored and names the record refused.
    async fn write_batch(&self, shard: &str, docs: &[RawDoc]) -> Result<(), StoreError> {
        let mut batch = TransactionalBatch::new(shard.to_owned());
        for d in docs {
            batch = batch.create_item(&d.doc).map_err(store_error)?;
        }
        self.stats.operations.fetch_add(1, Ordering::Relaxed);
        match self.raw.execute_transactional_batch(batch, None).await {
            Ok(resp) => {
                let status = u16::from(resp.status().status_code());
                if (200..300).contains(&status) && status != 207 {
                    self.count_documents(docs);
                    return Ok(());
                }
                // 207: the batch was rolled back; the culprit has its own status, the others
                // 424. A throttled batch is retried as a whole by the writer.
                let model = resp.into_model().map_err(store_error)?;
                if let Some(r) = model.results().iter().find(|r| r.status_code() == 429) {
                    return Err(StoreError::Unavailable(format!(
                        "Cosmos DB throttled a batch (retry after {:?})",
                        r.retry_after()
                    )));
                }
            }
            Err(e) if matches!(status_of(&e), 400 | 409 | 413) => {}
            Err(e) => return Err(store_error(e)),
        }
        for d in docs {
            self.write_one(d).await?;
        }
        Ok(())
    }

    fn count_documents(&self, docs: &[RawDoc]) {
        let bytes: usize = docs.iter().map(|d| d.doc.get().len()).sum();
        self.stats
            .documents
            .fetch_add(docs.len() as u64, Ordering::Relaxed);
        self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    async fn write_one(&self, d: &RawDoc) -> Result<(), StoreError> {
        self.stats.operations.fetch_add(1, Ordering::Relaxed);
        match self
            .raw
            .create_item(d.shard.clone(), &d.id, &d.doc, None)
            .await
        {
            Ok(_) => {
                self.count_documents(std::slice::from_ref(d));
                Ok(())
            }
            // Stored by an earlier attempt: appends are idempotent by record id.
            Err(e) if status_of(&e) == 409 => Ok(()),
            Err(e) if matches!(status_of(&e), 400 | 413) => Err(StoreError::Rejected {
                id: d.id.clone(),
                detail: format!("Cosmos DB refused the document: {e}"),
            }),
            Err(e) => Err(store_error(e)),
        }
    }
}

#[async_trait]
impl RawWriter for CosmosStore {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        self.append_encoded(batch, &[]).await
    }

    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<std::sync::Arc<str>>],
    ) -> Result<(), StoreError> {
        // Grouped by shard (a request's records share one), in order, cut at the batch limits:
        // in the common case one request's records are one batch, and several requests of one
        // shard share it.
        let mut by_shard: std::collections::BTreeMap<String, Vec<RawDoc>> = Default::default();
        for (i, r) in batch.iter().enumerate() {
            let made = json.get(i).and_then(|j| j.as_deref());
            let d = self.raw_doc(r, made)?;
            if d.doc.get().len() > ITEM_MAX_BYTES {
                return Err(StoreError::Rejected {
                    id: d.id,
                    detail: format!(
                        "{} bytes as a document, over Cosmos DB's item limit",
                        d.doc.get().len()
                    ),
                });
            }
            by_shard.entry(d.shard.clone()).or_default().push(d);
        }
        let mut batches: Vec<(String, Vec<RawDoc>)> = Vec::new();
        for (shard, docs) in by_shard {
            let mut current: Vec<RawDoc> = Vec::new();
            let mut bytes = 0;
            for d in docs {
                let len = d.doc.get().len();
                if !current.is_empty()
                    && (current.len() == BATCH_MAX_OPS || bytes + len > BATCH_MAX_BYTES)
                {
                    batches.push((shard.clone(), std::mem::take(&mut current)));
                    bytes = 0;
                }
                bytes += len;
                current.push(d);
            }
            if !current.is_empty() {
                batches.push((shard, current));
            }
        }
        futures_util::stream::iter(batches)
            .map(|(shard, docs)| async move { self.write_batch(&shard, &docs).await })
            .buffer_unordered(self.write_concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }
}

/// A raw document read back: the record, or the dead letter it becomes.
fn parse_raw(unit: &str, value: &serde_json::Value) -> Result<RawRecord, DeadLetter> {
    let text = value.to_string();
    let field = |name: &str| {
        value.get(name).map_or_else(String::new, |v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    serde_json::from_str::<RawRecord>(&text).map_err(|e| DeadLetter {
        // The documents of one transactional batch share an LSN: the document's own resource
        // id makes the position unique.
        position: format!("{unit}.{}.{}", field("_lsn"), field("_rid")),
        record_id: value
            .get("id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
        error: e.to_string(),
        document: text,
    })
}

/// A lease as stored in `leases`.
#[derive(Serialize, Deserialize)]
struct LeaseItem {
    id: String,
    kind: String,
    #[serde(flatten)]
    doc: LeaseDoc,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

/// A dead letter as stored in `leases`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterItem {
    id: String,
    kind: String,
    time_ms: i64,
    #[serde(flatten)]
    letter: DeadLetter,
}

fn lease_id(group: &str, unit: &str) -> Result<String, StoreError> {
    if group.contains(['/', '\\', '?', '#']) {
        return Err(StoreError::Config(format!(
            "parser group name {group:?} cannot name a Cosmos DB document (has / \\ ? #)"
        )));
    }
    Ok(format!("lease.{group}.{unit}"))
}

fn versioned(item: LeaseItem) -> Result<Versioned, StoreError> {
    Ok(Versioned {
        version: item
            .etag
            .ok_or_else(|| corrupt("lease document without an etag"))?,
        doc: item.doc,
    })
}

#[async_trait]
impl ChangeFeed for CosmosStore {
    fn units(&self) -> Vec<String> {
        self.units.as_ref().clone()
    }

    async fn read(
        &self,
        unit: &str,
        position: Option<&str>,
        max: usize,
    ) -> Result<FeedPage, StoreError> {
        if !self.units.iter().any(|u| u == unit) {
            return Err(StoreError::Config(format!(
                "the raw container has no shard {unit:?}"
            )));
        }
        let max =
            NonZeroU32::new(u32::try_from(max).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let mut options =
            ChangeFeedOptions::default().with_max_item_count(MaxItemCountHint::Limit(max));
        if let Some(p) = position {
            options = options.with_continuation_token(ContinuationToken::from_string(p.to_owned()));
        }
        let mut pages = self
            .raw
            .query_change_feed::<serde_json::Value>(
                FeedScope::partition(unit.to_owned()),
                ChangeFeedStartFrom::Beginning,
                Some(options),
            )
            .await
            .map_err(store_error)?;
        let items = match pages.try_next().await.map_err(store_error)? {
            Some(page) => page.into_items(),
            None => Vec::new(),
        };
        if items.is_empty() {
            return Ok(FeedPage {
                records: Vec::new(),
                position: position.map(str::to_owned),
                dead_letters: Vec::new(),
            });
        }
        let next = pages.to_continuation_token().map_err(store_error)?;
        let mut records = Vec::with_capacity(items.len());
        let mut dead_letters = Vec::new();
        for item in &items {
            let Some(value) = item.current() else {
                continue;
            };
            match parse_raw(unit, value) {
                Ok(r) => records.push(r),
                Err(letter) => dead_letters.push(letter),
            }
        }
        Ok(FeedPage {
            records,
            position: Some(next.as_str().to_owned()),
            dead_letters,
        })
    }

    async fn read_request(&self, request_id: &str) -> Result<Vec<RawRecord>, StoreError> {
        let shard = crate::unit_of(&self.units, request_id).to_owned();
        let query = param(
            Query::from("SELECT * FROM c WHERE c.requestId = @r"),
            "@r",
            request_id,
        )?;
        let docs: Vec<serde_json::Value> =
            query_all(&self.raw, query, FeedScope::partition(shard.clone())).await?;
        // An unreadable document is skipped here; the feed reports it as a dead letter.
        let mut records: Vec<RawRecord> = docs
            .iter()
            .filter_map(|d| parse_raw(&shard, d).ok())
            .collect();
        records.sort_by_key(RawRecord::seq);
        Ok(records)
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        for letter in letters {
            let id = format!(
                "dead.{}",
                letter.position.replace(['/', '\\', '?', '#'], "_")
            );
            let item = DeadLetterItem {
                id: id.clone(),
                kind: "deadLetter".into(),
                time_ms: now,
                letter: letter.clone(),
            };
            match self.leases.create_item(id.clone(), &id, &item, None).await {
                Ok(_) => {}
                Err(e) if status_of(&e) == 409 => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut items: Vec<DeadLetterItem> = query_all(
            &self.leases,
            Query::from("SELECT * FROM c WHERE c.kind = 'deadLetter'"),
            FeedScope::full_container(),
        )
        .await?;
        // Few, and sorted here: a cross-partition ORDER BY needs the query pipeline.
        items.sort_by(|a, b| (a.time_ms, &a.letter.position).cmp(&(b.time_ms, &b.letter.position)));
        Ok(items.into_iter().take(limit).map(|i| i.letter).collect())
    }

    async fn lease_doc(&self, group: &str, unit: &str) -> Result<Option<Versioned>, StoreError> {
        let id = lease_id(group, unit)?;
        find::<LeaseItem>(&self.leases, &id)
            .await?
            .map(versioned)
            .transpose()
    }

    async fn lease_docs(&self, group: &str) -> Result<Vec<Versioned>, StoreError> {
        let query = param(
            Query::from("SELECT * FROM c WHERE c.kind = 'lease' AND c[\"group\"] = @g"),
            "@g",
            group,
        )?;
        let items: Vec<LeaseItem> =
            query_all(&self.leases, query, FeedScope::full_container()).await?;
        items.into_iter().map(versioned).collect()
    }

    async fn put_lease_doc(
        &self,
        doc: &LeaseDoc,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let id = lease_id(&doc.group, &doc.unit)?;
        let item = LeaseItem {
            id: id.clone(),
            kind: "lease".into(),
            doc: doc.clone(),
            etag: None,
        };
        match write_if(&self.leases, &id, &item, expected).await? {
            Written::Etag(etag) => Ok(Some(etag)),
            Written::Unknown => Ok(self
                .lease_doc(&doc.group, &doc.unit)
                .await?
                .map(|v| v.version)),
            Written::Refused => Ok(None),
        }
    }
}
