//! Storage for Tollgate's records, split by capability so each service depends on only what it
//! uses: the proxy on [`RawWriter`] (and [`ConsumerRegistry`] for consumers created at run
//! time), the parser on [`ChangeFeed`] + [`RequestStore`], reports on [`RequestStore`].
//!
//! Backends: `embedded` (SQLite, default) — the Cosmos DB backend implements the same traits.
//! Every backend must pass [`conformance`].
//!
//! Invariants every backend keeps:
//! - appending a raw record whose id (`"{requestId}:{seq}"`) is already stored is a no-op, so the
//!   proxy may replay a batch after an ambiguous failure;
//! - the change feed returns each appended record once, in append order, from an opaque
//!   position that survives restarts;
//! - upserting a consolidated record replaces the one with the same id.

#[cfg(feature = "embedded")]
pub mod embedded;

#[cfg(feature = "cosmos")]
pub mod cosmos;

#[cfg(feature = "conformance")]
pub mod conformance;

mod cosmos_config;
pub mod lease;

pub use cosmos_config::{CosmosAuth, CosmosConfig, CosmosContainers};

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tollgate_records::{ConsolidatedRecord, RawRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored document is not a valid record: {0}")]
    Corrupt(String),
    #[error("store configuration is invalid: {0}")]
    Config(String),
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    /// The store refused a record for good (too large, malformed for this backend): retrying
    /// the same record can never succeed, so the writer must set it aside, not retry forever.
    /// `id` names the record, or is empty when the store cannot tell which one of the batch
    /// (the writer then narrows it down).
    #[error("store rejected record {id}: {detail}")]
    Rejected { id: String, detail: String },
    /// Another reader took this feed unit's lease (it had expired): stop reading the unit.
    #[error("the lease on feed unit {unit} was taken by another reader")]
    LeaseLost { unit: String },
}

impl StoreError {
    /// Whether retrying the same call may succeed. Only a refusal of the record itself
    /// ([`StoreError::Rejected`]) is permanent: an outage, a throttle, and also a store that is
    /// misconfigured or reports corruption are retried (records wait in the spool), because
    /// setting records aside for a fault of the store would set every record aside.
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Rejected { .. })
    }
}

/// Appends raw records; used by the logging proxy's batch writer.
#[async_trait]
pub trait RawWriter: Send + Sync + 'static {
    /// Appends the batch atomically where the backend can; records already stored are skipped.
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError>;

    /// [`RawWriter::append`], with each record's JSON (`serde_json` of the record) where the
    /// caller made it already — the proxy serialises a record once, for its journal — index
    /// for index with `batch` (`None`, or a shorter slice: not made). A backend that stores
    /// the JSON uses it instead of serialising the record again.
    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<std::sync::Arc<str>>],
    ) -> Result<(), StoreError> {
        let _ = json;
        self.append(batch).await
    }
}

/// Where a change-feed reader stands: an opaque backend position plus the requests it has seen
/// start but not yet finish, so a restarted parser still finalises them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Backend-specific; `None` means the beginning of the feed.
    #[serde(default)]
    pub position: Option<String>,
    #[serde(default)]
    pub pending: Vec<PendingRequest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRequest {
    pub request_id: String,
    pub first_seen: DateTime<Utc>,
    /// The request's `end` record has been read: any later record of it (a segment replayed
    /// from a spool after the end) makes it ready, across parser restarts too.
    #[serde(default)]
    pub end_seen: bool,
}

#[derive(Debug, Clone)]
pub struct FeedPage {
    pub records: Vec<RawRecord>,
    /// Position after the last record of this page (unchanged when the page is empty).
    pub position: Option<String>,
    /// Documents in this page that could not be read as records. The feed moves past them;
    /// the reader must set them aside with [`ChangeFeed::dead_letter`] before it saves a
    /// checkpoint beyond them.
    pub dead_letters: Vec<DeadLetter>,
}

/// A stored document that could not be read as a raw record, kept with where it was and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The backend's feed position of the document (unique per document).
    pub position: String,
    /// The record id (`"{requestId}:{seq}"`) when the backend knows it without the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    pub error: String,
    /// The document as stored.
    pub document: String,
}

/// Reads raw records in append order; used by the log parser.
///
/// The feed is divided into units ([`ChangeFeed::units`]): each has its own order and position,
/// and every record of one request is in one unit, so replicas that each read a share of the
/// units never assemble the same request. The embedded store is one unit.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// The units of the feed; fixed for the store's life.
    fn units(&self) -> Vec<String>;
    /// Up to `max` records of `unit` after `position`. A document that cannot be read never
    /// fails the page: it is returned in [`FeedPage::dead_letters`] and the position moves past
    /// it.
    async fn read(
        &self,
        unit: &str,
        position: Option<&str>,
        max: usize,
    ) -> Result<FeedPage, StoreError>;
    /// All readable raw records of one request, ordered by seq (unreadable ones are skipped;
    /// the feed reports them as dead letters).
    async fn read_request(&self, request_id: &str) -> Result<Vec<RawRecord>, StoreError>;
    /// Keeps documents the feed could not read; writing the same position again is a no-op.
    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError>;
    /// The dead letters kept so far, oldest first, at most `limit`.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    /// The lease of one unit for a group of readers, with its version.
    async fn lease_doc(
        &self,
        group: &str,
        unit: &str,
    ) -> Result<Option<lease::Versioned>, StoreError>;
    /// Every lease of a group.
    async fn lease_docs(&self, group: &str) -> Result<Vec<lease::Versioned>, StoreError>;
    /// Writes `doc` if the stored lease still has version `expected` (`None`: only if there is
    /// none); its new version, or `None` when the condition failed.
    async fn put_lease_doc(
        &self,
        doc: &lease::LeaseDoc,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError>;
}

/// The unit of a sharded feed that holds `request_id`'s records: a hash of the id that never
/// changes between versions or processes (CRC-32), so every writer puts a request's records in
/// the same unit and a reader finds them there.
pub fn unit_of<'a>(units: &'a [String], request_id: &str) -> &'a str {
    let hash = crc32fast::hash(request_id.as_bytes()) as usize;
    units
        .get(hash % units.len().max(1))
        .map_or("", String::as_str)
}

/// The checkpoint a group of readers saved for one unit (without taking its lease).
pub async fn load_checkpoint(
    feed: &dyn ChangeFeed,
    group: &str,
    unit: &str,
) -> Result<Option<Checkpoint>, StoreError> {
    Ok(feed.lease_doc(group, unit).await?.map(|v| v.doc.checkpoint))
}

/// A time window and optional filters over consolidated records.
#[derive(Debug, Clone, Default)]
pub struct RecordQuery {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub consumer: Option<String>,
    pub deployment: Option<String>,
    pub limit: Option<usize>,
}

/// One row of the usage report: a (consumer, deployment, model, backend, day) group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    pub consumer: String,
    pub deployment: String,
    pub model: String,
    /// The backend that served the requests (empty: none did, e.g. refused by Tollgate).
    #[serde(default)]
    pub backend: String,
    pub day: String,
    pub requests: u64,
    /// Requests that failed, never ended, or whose answer was cut (a 200 whose stream the
    /// backend or a limit cut short is not a success).
    pub errors: u64,
    /// Of `errors`, the requests answered 429: over a consumer's minute limit, or every backend
    /// throttled (a spent day or month quota answers 403 and is among the other errors).
    #[serde(default)]
    pub throttled_requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    /// Of `output_tokens`, the reasoning an o-series model billed but never sent.
    pub reasoning_tokens: u64,
    /// Usage counted by Tollgate from a complete exchange (AOAI gave no figure).
    pub estimated_requests: u64,
    /// AOAI's figure, asked for by the proxy on the client's behalf.
    pub injected_requests: u64,
    /// Counted from a cut answer: the real usage is at least the figure.
    pub lower_bound_requests: u64,
    /// Served by AOAI with no figure reported or countable.
    pub unknown_usage_requests: u64,
    /// Cost of the priced requests only, exactly.
    pub cost: tollgate_records::Money,
    /// Requests that used tokens but have no price ([`ConsolidatedRecord::unpriced`]).
    pub unpriced_requests: u64,
}

/// Consolidated records; written by the parser, read by reports.
#[async_trait]
pub trait RequestStore: Send + Sync + 'static {
    async fn upsert(&self, records: &[ConsolidatedRecord]) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<ConsolidatedRecord>, StoreError>;
    /// Records in the window, newest first.
    async fn list(&self, query: &RecordQuery) -> Result<Vec<ConsolidatedRecord>, StoreError>;
    /// Usage grouped by consumer, deployment, model, serving backend and UTC day, ordered by
    /// day, consumer, deployment, model, backend.
    async fn usage(&self, query: &RecordQuery) -> Result<Vec<UsageRow>, StoreError>;
}

/// One entry of the consumer registry: the document the proxy wrote (the store does not read
/// it), and its version for conditional writes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConsumer {
    pub id: String,
    pub document: serde_json::Value,
    pub version: String,
}

/// The consumers created at run time (`tollgate consumers`, the admin API), shared by every
/// proxy replica through the store. The documents carry their own history, so a change and
/// its audit entry are one conditional write.
#[async_trait]
pub trait ConsumerRegistry: Send + Sync + 'static {
    /// Every registered consumer (deleted ones too: their documents keep their history).
    async fn consumers(&self) -> Result<Vec<StoredConsumer>, StoreError>;
    async fn consumer(&self, id: &str) -> Result<Option<StoredConsumer>, StoreError>;
    /// Writes `document` for `id` if the stored version is `expected` (`None`: only if there is
    /// none); the new version, or `None` when the condition failed (someone else wrote first).
    async fn put_consumer(
        &self,
        id: &str,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError>;
}

/// Whether `id` can name a registered consumer in every backend (a Cosmos DB document id
/// refuses `/ \ ? #`; limit counters use `|`, `{`, `}`): letters, digits, `.`, `_`, `-`,
/// at most 64.
pub fn valid_consumer_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The configured backend, `store.type` in the configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    Embedded {
        /// Directory holding the SQLite database (`tollgate.sqlite`).
        #[serde(default = "default_data_dir")]
        data_dir: PathBuf,
        /// How long a writer waits for a lock held by another process before failing.
        #[serde(default = "default_busy_timeout_ms")]
        busy_timeout_ms: u64,
    },
    /// Cosmos DB for NoSQL: the production store, shared by any number of proxy and parser
    /// replicas.
    Cosmos(CosmosConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Embedded {
            data_dir: default_data_dir(),
            busy_timeout_ms: default_busy_timeout_ms(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_busy_timeout_ms() -> u64 {
    5_000
}

impl StoreConfig {
    /// The embedded configuration rooted at `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig::Embedded {
            data_dir: data_dir.into(),
            busy_timeout_ms: default_busy_timeout_ms(),
        }
    }

    pub fn data_dir(&self) -> Option<&std::path::Path> {
        match self {
            StoreConfig::Embedded { data_dir, .. } => Some(data_dir),
            StoreConfig::Cosmos(_) => None,
        }
    }
}

/// One opened backend, exposing every capability.
pub trait Store: RawWriter + ChangeFeed + RequestStore + ConsumerRegistry {}
impl<T: RawWriter + ChangeFeed + RequestStore + ConsumerRegistry> Store for T {}

/// Opens a store that must already hold Tollgate's data, for commands that only read
/// (`report`, `check`): a mistyped data directory is an error naming it, not a new empty store
/// that reports zeros.
pub async fn open_existing(config: &StoreConfig) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match config {
        #[cfg(feature = "embedded")]
        StoreConfig::Embedded { data_dir, .. } => {
            let file = data_dir.join(embedded::DATABASE_FILE);
            if !file.is_file() {
                return Err(StoreError::Config(format!(
                    "{} holds no Tollgate store ({} is missing); point --data-dir or \
                     store.data_dir at the directory `tollgate up` writes to",
                    data_dir.display(),
                    embedded::DATABASE_FILE
                )));
            }
        }
        // `open` says this build has no embedded store.
        #[cfg(not(feature = "embedded"))]
        StoreConfig::Embedded { .. } => {}
        // Checked, never created: a command that only reads must not set up an account.
        #[cfg(feature = "cosmos")]
        StoreConfig::Cosmos(c) => {
            return Ok(std::sync::Arc::new(
                cosmos::CosmosStore::open_existing(c).await?,
            ));
        }
        #[cfg(not(feature = "cosmos"))]
        StoreConfig::Cosmos(_) => {}
    }
    open(config).await
}

/// Opens the configured backend (creating an embedded store if there is none) and runs its
/// healthcheck.
pub async fn open(config: &StoreConfig) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match config {
        #[cfg(feature = "embedded")]
        StoreConfig::Embedded {
            data_dir,
            busy_timeout_ms,
        } => {
            let store = embedded::EmbeddedStore::open(data_dir, *busy_timeout_ms).await?;
            Ok(std::sync::Arc::new(store))
        }
        #[cfg(not(feature = "embedded"))]
        StoreConfig::Embedded { .. } => Err(StoreError::Config(
            "built without the `embedded` store feature".into(),
        )),
        #[cfg(feature = "cosmos")]
        StoreConfig::Cosmos(c) => Ok(std::sync::Arc::new(cosmos::CosmosStore::open(c).await?)),
        #[cfg(not(feature = "cosmos"))]
        StoreConfig::Cosmos(_) => Err(StoreError::Config(
            "built without the `cosmos` store feature".into(),
        )),
    }
}
