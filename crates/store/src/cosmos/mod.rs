//! The Cosmos DB for NoSQL backend (`azure_data_cosmos` 1.0): the production store that any
//! number of proxy and parser replicas share.
//!
//! Containers (created when missing with `create_if_missing`, otherwise checked at start):
//! - `raw`, partition key `/shard`: raw records, one document each, id `"{requestId}:{seq}"`,
//!   `shard` a hash of the request id (`crate::unit_of`). All records of a request share a
//!   shard, so they are written in one transactional batch and read back from one logical
//!   partition; each shard's change feed is one unit the parser replicas lease. Bodies are not
//!   indexed. Records expire after `raw_ttl_days`.
//! - `requests`, partition key `/id`: consolidated records. Writes spread evenly and never fill
//!   one logical partition (a big consumer's year of records would pass 20 GB under
//!   `/consumer`, and a day's records would all land on one partition under `/day`); a request
//!   found by id is a 1 RU point read; the analysts' questions (by consumer, deployment, model,
//!   day) filter on indexed fields and fan out only over physical partitions. Prompts and
//!   answers are not indexed.
//! - `leases`, partition key `/id`: one document per (parser group, unit) with the unit's
//!   checkpoint, written with `If-Match` on its etag (see `crate::lease`); the raw container's
//!   shard count (`meta.raw`); dead letters; and the consumer registry (`consumer.{id}`, few
//!   and small, read whole by every proxy replica's poll).

mod consumers;
mod feed;
mod requests;
mod setup;

use std::sync::Arc;

use azure_data_cosmos::clients::ContainerClient;
use azure_data_cosmos::{CosmosError, Query};
use futures_util::TryStreamExt;
use serde::de::DeserializeOwned;

use crate::{CosmosConfig, StoreError};

pub use setup::connect;

/// Cosmos DB refuses an item over 2 MB (2,097,152 bytes of JSON); checked before sending, below
/// that by a batch's framing, so a record that can never be stored is named before anything is
/// sent (the proxy splits bodies into parts well under it: `max_body_part_bytes`).
const ITEM_MAX_BYTES: usize = 2_000_000;

/// An opened Cosmos DB store.
#[derive(Clone)]
pub struct CosmosStore {
    raw: Arc<ContainerClient>,
    requests: Arc<ContainerClient>,
    leases: Arc<ContainerClient>,
    units: Arc<Vec<String>>,
    write_concurrency: usize,
    stats: Arc<RawWriteStats>,
}

/// What writing raw records has cost, for operators and the benchmark: the system Tollgate
/// replaces wrote one item per SSE line.
#[derive(Debug, Default)]
pub struct RawWriteStats {
    /// Requests to Cosmos DB: transactional batches, and single creates after a batch Cosmos
    /// refused as a whole.
    pub operations: std::sync::atomic::AtomicU64,
    /// Documents written.
    pub documents: std::sync::atomic::AtomicU64,
    /// Bytes of the documents written (JSON).
    pub bytes: std::sync::atomic::AtomicU64,
}

impl CosmosStore {
    /// Connects, creates or checks the database and containers, and checks the raw container's
    /// shard count against the configuration.
    pub async fn open(config: &CosmosConfig) -> Result<Self, StoreError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StoreError::Config(problems.join("; ")));
        }
        setup::open(config, false).await
    }

    /// Opens a store that must exist, for commands that only read: nothing is created or
    /// recorded in the account.
    pub async fn open_existing(config: &CosmosConfig) -> Result<Self, StoreError> {
        let mut config = config.clone();
        config.create_if_missing = false;
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StoreError::Config(problems.join("; ")));
        }
        setup::open(&config, true).await
    }

    /// What writing raw records has cost so far.
    pub fn raw_write_stats(&self) -> &RawWriteStats {
        &self.stats
    }
}

/// A Cosmos error as a store error: a throttle the SDK's own retries (which honour
/// `x-ms-retry-after-ms`) did not outlast, an outage, or a timeout is transient and the records
/// wait in the spool; a missing container or a refused credential is a configuration error
/// (also retried: fixing it must not lose records).
fn store_error(e: CosmosError) -> StoreError {
    let status = e.status();
    let code = u16::from(status.status_code());
    let sub = status.sub_status().map(u16::from);
    match (code, sub) {
        // A full logical partition: a shard of the raw container passed 20 GB. Retried (the
        // records spool) but named, since only a shorter retention makes room.
        (403, Some(1014)) => StoreError::Unavailable(format!(
            "a Cosmos DB logical partition is full (20 GB); shorten raw_ttl_days: {e}"
        )),
        (401 | 403 | 404, _) => StoreError::Config(format!("Cosmos DB answered {code}: {e}")),
        _ => StoreError::Unavailable(format!("Cosmos DB answered {code}: {e}")),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn status_of(e: &CosmosError) -> u16 {
    u16::from(e.status().status_code())
}

/// What a conditional write did.
pub(super) enum Written {
    /// Written; the document's new etag.
    Etag(String),
    /// Written, but the server left the etag header out (the stored document has it).
    Unknown,
    /// Someone else wrote first (409 on create, 412 on a stale etag) or it is gone (404).
    Refused,
}

/// Writes `item` as document `id` (in partition `id`) of `container` if the stored one has
/// etag `expected` (`None`: only if there is none): leases and registered consumers.
pub(super) async fn write_if<T: serde::Serialize + Send + Sync>(
    container: &ContainerClient,
    id: &str,
    item: &T,
    expected: Option<&str>,
) -> Result<Written, StoreError> {
    use azure_core::http::Etag;
    use azure_data_cosmos::options::{ItemWriteOptions, Precondition};
    let result = match expected {
        None => container.create_item(id.to_owned(), id, item, None).await,
        Some(etag) => {
            let options = ItemWriteOptions::default()
                .with_precondition(Precondition::if_match(Etag::from(etag)));
            container
                .replace_item(id.to_owned(), id, item, Some(options))
                .await
        }
    };
    match result {
        Ok(resp) => Ok(resp
            .headers()
            .etag()
            .map_or(Written::Unknown, |e| Written::Etag(e.to_string()))),
        Err(e) if matches!(status_of(&e), 404 | 409 | 412) => Ok(Written::Refused),
        Err(e) => Err(store_error(e)),
    }
}

/// Runs a query and collects every item.
async fn query_all<T: DeserializeOwned + Send + 'static>(
    container: &ContainerClient,
    query: Query,
    scope: azure_data_cosmos::FeedScope,
) -> Result<Vec<T>, StoreError> {
    container
        .query_items::<T>(query, scope, None)
        .await
        .map_err(store_error)?
        .try_collect()
        .await
        .map_err(store_error)
}

/// The document with `id` in partition `id` (the `leases` and `requests` containers are keyed
/// by id), or `None`. A single-partition query rather than a point read: the Cosmos test server
/// answers a point read of a missing document with 500 instead of 404, and the difference on
/// Cosmos DB (about 3 RU against 1) is paid only for leases and single-request lookups.
async fn find<T: DeserializeOwned + Send + 'static>(
    container: &ContainerClient,
    id: &str,
) -> Result<Option<T>, StoreError> {
    let query = param(Query::from("SELECT * FROM c WHERE c.id = @id"), "@id", id)?;
    let mut found: Vec<T> = query_all(
        container,
        query,
        azure_data_cosmos::FeedScope::partition(id.to_owned()),
    )
    .await?;
    Ok(found.pop())
}

/// `value` as a JSON document with `fields` (name, value) in front of its own fields: the
/// fields the container needs (id, partition key, query fields) are spliced into the serialised
/// record instead of serialising it a second time through a map.
fn document_with<T: serde::Serialize>(
    value: &T,
    fields: &[(&str, serde_json::Value)],
) -> Result<Box<serde_json::value::RawValue>, StoreError> {
    splice(&serde_json::to_string(value).map_err(corrupt)?, fields)
}

/// `body` (a JSON object) with `fields` in front of its own fields.
fn splice(
    body: &str,
    fields: &[(&str, serde_json::Value)],
) -> Result<Box<serde_json::value::RawValue>, StoreError> {
    let rest = body
        .strip_prefix('{')
        .ok_or_else(|| corrupt("a record is not a JSON object"))?;
    let mut text = String::with_capacity(body.len() + 64);
    text.push('{');
    for (name, v) in fields {
        text.push_str(&serde_json::to_string(name).map_err(corrupt)?);
        text.push(':');
        text.push_str(&v.to_string());
        text.push(',');
    }
    if rest == "}" {
        text.pop();
    }
    text.push_str(rest);
    serde_json::value::RawValue::from_string(text).map_err(corrupt)
}

fn param(query: Query, name: &str, value: impl serde::Serialize) -> Result<Query, StoreError> {
    query.with_parameter(name, value).map_err(store_error)
}
