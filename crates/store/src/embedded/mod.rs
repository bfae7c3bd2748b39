//! The embedded backend: one SQLite database in WAL mode, so `tollgate up` needs no server.
//!
//! - `raw`: append-only; `pos INTEGER PRIMARY KEY AUTOINCREMENT` is the change feed position.
//!   SQLite serialises writers and assigns `pos` at commit order, so a reader that has seen
//!   position p never later finds a committed row below p. `(request_id, seq)` — the record id
//!   — is unique and inserts use `OR IGNORE`, which makes replays idempotent; the same index
//!   serves reads of one request.
//! - `leases`: the feed's one unit ([`UNIT`]) leased per group of readers, with the group's
//!   checkpoint in it (see [`crate::lease`]); `version` makes writes conditional. Earlier
//!   versions kept checkpoints by name in `checkpoints`: a group's first lease starts from its
//!   checkpoint there.
//! - `consumers`: the consumer registry, one JSON document per consumer with a `version` for
//!   conditional writes.
//! - `requests`: consolidated records, with the fields reports group by as indexed columns
//!   and the full record as JSON.
//!
//! SQLite calls are blocking, so every call runs on tokio's blocking pool; one connection writes
//! and another reads, which WAL lets run concurrently.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tollgate_records::{ConsolidatedRecord, Money, RawRecord};

use crate::{
    ChangeFeed, ConsumerRegistry, DeadLetter, FeedPage, RawWriter, RecordQuery, RequestStore,
    StoreError, StoredConsumer, UsageRow,
};

#[cfg(test)]
mod tests;

/// The embedded feed's one unit.
pub const UNIT: &str = "0";

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "tollgate.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    doc TEXT NOT NULL,
    UNIQUE (request_id, seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    position TEXT PRIMARY KEY,
    record_id TEXT,
    error TEXT NOT NULL,
    doc TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    grp TEXT NOT NULL,
    unit TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (grp, unit)
);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    day TEXT NOT NULL,
    consumer TEXT NOT NULL,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,
    operation TEXT NOT NULL,
    status INTEGER,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    cost REAL NOT NULL,
    doc TEXT NOT NULL,
    unpriced INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS consumers (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time_ms);
CREATE INDEX IF NOT EXISTS requests_consumer ON requests (consumer, time_ms);
CREATE INDEX IF NOT EXISTS requests_deployment ON requests (deployment, model, time_ms);
";

/// Brings a database an earlier version created up to [`SCHEMA`].
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_unpriced = conn
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'unpriced'")
        .and_then(|mut s| s.exists([]))
        .map_err(io)?;
    if !has_unpriced {
        // Earlier versions stored an unpriced request's cost as 0; its record has no cost.
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE requests ADD COLUMN unpriced INTEGER NOT NULL DEFAULT 0;
             UPDATE requests SET unpriced = 1
              WHERE total_tokens > 0 AND json_extract(doc, '$.cost') IS NULL;
             COMMIT;",
        )
        .map_err(io)?;
    }
    Ok(())
}

#[derive(Clone)]
pub struct EmbeddedStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database in `data_dir`.
    pub async fn open(data_dir: &Path, busy_timeout_ms: u64) -> Result<Self, StoreError> {
        let dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&dir, busy_timeout_ms))
            .await
            .map_err(io)?
    }

    fn open_blocking(data_dir: &Path, busy_timeout_ms: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Config(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let connect = || -> Result<Connection, StoreError> {
            let conn = Connection::open(&path).map_err(io)?;
            conn.busy_timeout(std::time::Duration::from_millis(busy_timeout_ms))
                .map_err(io)?;
            // WAL lets the parser read while the proxy writes; NORMAL syncs at checkpoints,
            // which in WAL mode still never corrupts the database on power loss.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(io)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(io)?;
            Ok(conn)
        };
        let writer = connect()?;
        writer.execute_batch(SCHEMA).map_err(io)?;
        migrate(&writer)?;
        let reader = connect()?;
        Ok(EmbeddedStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    async fn with<T, F>(conn: &Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(io)?
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::with(&self.writer, f).await
    }

    async fn read_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        Self::with(&self.reader, f).await
    }
}

#[async_trait]
impl RawWriter for EmbeddedStore {
    async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
        self.append_encoded(batch, &[]).await
    }

    async fn append_encoded(
        &self,
        batch: &[RawRecord],
        json: &[Option<Arc<str>>],
    ) -> Result<(), StoreError> {
        // Serialised outside the lock (unless the caller did already) so the writer
        // connection is held only for SQLite's work.
        let rows = batch
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let doc: Arc<str> = match json.get(i) {
                    Some(Some(made)) => made.clone(),
                    _ => Arc::from(serde_json::to_string(r).map_err(corrupt)?),
                };
                Ok((r.request_id().to_owned(), r.seq(), r.kind(), doc))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(move |conn| {
            let tx = conn.transaction().map_err(io)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO raw (request_id, seq, kind, doc) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(io)?;
                for (request_id, seq, kind, doc) in &rows {
                    stmt.execute(params![request_id, seq, kind, &**doc])
                        .map_err(io)?;
                }
            }
            tx.commit().map_err(io)
        })
        .await
    }
}

fn parse_position(position: Option<&str>) -> Result<i64, StoreError> {
    match position {
        None => Ok(0),
        Some(p) => p
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("bad feed position {p:?}"))),
    }
}

#[async_trait]
impl ChangeFeed for EmbeddedStore {
    fn units(&self) -> Vec<String> {
        vec![UNIT.to_owned()]
    }

    async fn read(
        &self,
        unit: &str,
        position: Option<&str>,
        max: usize,
    ) -> Result<FeedPage, StoreError> {
        if unit != UNIT {
            return Err(StoreError::Config(format!(
                "the embedded store's feed has one unit, {UNIT:?}, not {unit:?}"
            )));
        }
        let after = parse_position(position)?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let (rows, last) = self
            .read_conn(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT pos, request_id, seq, doc FROM raw WHERE pos > ?1 ORDER BY pos LIMIT ?2",
                    )
                    .map_err(io)?;
                let mut last = after;
                let mut docs = Vec::new();
                let mut rows = stmt.query(params![after, max]).map_err(io)?;
                while let Some(row) = rows.next().map_err(io)? {
                    last = row.get(0).map_err(io)?;
                    let id = tollgate_records::raw_record_id(
                        &row.get::<_, String>(1).map_err(io)?,
                        row.get(2).map_err(io)?,
                    );
                    docs.push((last, id, row.get::<_, String>(3).map_err(io)?));
                }
                Ok((docs, last))
            })
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        let mut dead_letters = Vec::new();
        for (pos, id, doc) in rows {
            match serde_json::from_str::<RawRecord>(&doc) {
                Ok(r) => records.push(r),
                Err(e) => dead_letters.push(DeadLetter {
                    position: pos.to_string(),
                    record_id: Some(id),
                    error: e.to_string(),
                    document: doc,
                }),
            }
        }
        let position = if last > after || position.is_some() {
            Some(last.to_string())
        } else {
            None
        };
        Ok(FeedPage {
            records,
            position,
            dead_letters,
        })
    }

    async fn read_request(&self, request_id: &str) -> Result<Vec<RawRecord>, StoreError> {
        let request_id = request_id.to_owned();
        let docs = self
            .read_conn(move |conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT doc FROM raw WHERE request_id = ?1 ORDER BY seq")
                    .map_err(io)?;
                let docs = stmt
                    .query_map(params![request_id], |row| row.get::<_, String>(0))
                    .map_err(io)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(io)?;
                Ok(docs)
            })
            .await?;
        // An unreadable document is skipped here; the feed reports it as a dead letter.
        Ok(docs
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect())
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let letters = letters.to_vec();
        let now = chrono::Utc::now().timestamp_millis();
        self.write(move |conn| {
            let tx = conn.transaction().map_err(io)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO dead_letters (position, record_id, error, doc, time_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(io)?;
                for l in &letters {
                    stmt.execute(params![l.position, l.record_id, l.error, l.document, now])
                        .map_err(io)?;
                }
            }
            tx.commit().map_err(io)
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT position, record_id, error, doc FROM dead_letters
                     ORDER BY time_ms, position LIMIT ?1",
                )
                .map_err(io)?;
            let rows = stmt
                .query_map(params![limit], |r| {
                    Ok(DeadLetter {
                        position: r.get(0)?,
                        record_id: r.get(1)?,
                        error: r.get(2)?,
                        document: r.get(3)?,
                    })
                })
                .map_err(io)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io)?;
            Ok(rows)
        })
        .await
    }

    async fn lease_doc(
        &self,
        group: &str,
        unit: &str,
    ) -> Result<Option<crate::lease::Versioned>, StoreError> {
        let (group, unit) = (group.to_owned(), unit.to_owned());
        let row = self
            .write(move |conn| {
                let row = conn
                    .query_row(
                        "SELECT version, doc FROM leases WHERE grp = ?1 AND unit = ?2",
                        params![group, unit],
                        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                    )
                    .optional()
                    .map_err(io)?;
                if row.is_some() || unit != UNIT {
                    return Ok(row);
                }
                carry_over_checkpoint(conn, &group)
            })
            .await?;
        row.map(versioned).transpose()
    }

    async fn lease_docs(&self, group: &str) -> Result<Vec<crate::lease::Versioned>, StoreError> {
        let group = group.to_owned();
        let rows = self
            .read_conn(move |conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT version, doc FROM leases WHERE grp = ?1 ORDER BY unit")
                    .map_err(io)?;
                let rows = stmt
                    .query_map(params![group], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(io)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(io)?;
                Ok(rows)
            })
            .await?;
        rows.into_iter().map(versioned).collect()
    }

    async fn put_lease_doc(
        &self,
        doc: &crate::lease::LeaseDoc,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let text = serde_json::to_string(doc).map_err(corrupt)?;
        let (group, unit) = (doc.group.clone(), doc.unit.clone());
        let expected = expected
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| StoreError::Corrupt(format!("bad lease version {v:?}")))
            })
            .transpose()?;
        self.write(move |conn| {
            let (changed, version) = match expected {
                None => (
                    conn.execute(
                        "INSERT OR IGNORE INTO leases (grp, unit, version, doc) VALUES (?1, ?2, 1, ?3)",
                        params![group, unit, text],
                    )
                    .map_err(io)?,
                    1,
                ),
                Some(v) => (
                    conn.execute(
                        "UPDATE leases SET version = ?4, doc = ?3
                         WHERE grp = ?1 AND unit = ?2 AND version = ?5",
                        params![group, unit, text, v + 1, v],
                    )
                    .map_err(io)?,
                    v + 1,
                ),
            };
            Ok((changed == 1).then(|| version.to_string()))
        })
        .await
    }
}

/// A group's first lease, started from the checkpoint an earlier version saved under the
/// group's name.
fn carry_over_checkpoint(
    conn: &Connection,
    group: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let old = conn
        .query_row(
            "SELECT doc FROM checkpoints WHERE name = ?1",
            params![group],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(io)?;
    let Some(old) = old else {
        return Ok(None);
    };
    let doc = crate::lease::LeaseDoc {
        group: group.to_owned(),
        unit: UNIT.to_owned(),
        owner: None,
        expires: chrono::DateTime::UNIX_EPOCH,
        requested_by: None,
        checkpoint: serde_json::from_str(&old).map_err(corrupt)?,
    };
    let text = serde_json::to_string(&doc).map_err(corrupt)?;
    conn.execute(
        "INSERT INTO leases (grp, unit, version, doc) VALUES (?1, ?2, 1, ?3)",
        params![group, UNIT, text],
    )
    .map_err(io)?;
    Ok(Some((1, text)))
}

fn versioned((version, doc): (i64, String)) -> Result<crate::lease::Versioned, StoreError> {
    Ok(crate::lease::Versioned {
        doc: serde_json::from_str(&doc).map_err(corrupt)?,
        version: version.to_string(),
    })
}

struct RequestRow {
    id: String,
    time_ms: i64,
    day: String,
    consumer: String,
    deployment: String,
    model: String,
    operation: String,
    status: Option<u16>,
    input: u64,
    cached: u64,
    output: u64,
    total: u64,
    estimated: bool,
    /// Exact as a decimal (see [`Money`]); summed as whole nano-units.
    cost: f64,
    unpriced: bool,
    doc: String,
}

impl RequestRow {
    fn from_record(r: &ConsolidatedRecord) -> Result<Self, StoreError> {
        let usage = r.usage.as_ref();
        Ok(RequestRow {
            id: r.id.clone(),
            time_ms: r.time.timestamp_millis(),
            day: r.day(),
            consumer: r.consumer.id.clone(),
            deployment: r.deployment.clone().unwrap_or_default(),
            model: r.model.clone().unwrap_or_default(),
            operation: r.operation.clone(),
            status: r.status,
            input: usage.map_or(0, |u| u.input_tokens),
            cached: usage.map_or(0, |u| u.cached_input_tokens),
            output: usage.map_or(0, |u| u.output_tokens),
            total: usage.map_or(0, |u| u.total_tokens),
            estimated: usage.is_some_and(|u| u.source == tollgate_records::UsageSource::Estimated),
            // An unpriced request adds nothing to a sum of costs; `unpriced` says so.
            cost: r.cost.as_ref().map_or(0.0, |c| c.total.as_f64()),
            unpriced: r.unpriced,
            doc: serde_json::to_string(r).map_err(corrupt)?,
        })
    }
}

/// SQL `WHERE` clause and parameters for a query's filters.
fn filters(q: &RecordQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut clauses = vec!["1 = 1".to_owned()];
    let mut params = Vec::new();
    if let Some(from) = q.from {
        clauses.push(format!("time_ms >= ?{}", params.len() + 1));
        params.push(V::Integer(from.timestamp_millis()));
    }
    if let Some(to) = q.to {
        clauses.push(format!("time_ms < ?{}", params.len() + 1));
        params.push(V::Integer(to.timestamp_millis()));
    }
    if let Some(c) = &q.consumer {
        clauses.push(format!("consumer = ?{}", params.len() + 1));
        params.push(V::Text(c.clone()));
    }
    if let Some(d) = &q.deployment {
        clauses.push(format!("deployment = ?{}", params.len() + 1));
        params.push(V::Text(d.clone()));
    }
    (clauses.join(" AND "), params)
}

#[async_trait]
impl RequestStore for EmbeddedStore {
    async fn upsert(&self, records: &[ConsolidatedRecord]) -> Result<(), StoreError> {
        let rows = records
            .iter()
            .map(RequestRow::from_record)
            .collect::<Result<Vec<_>, _>>()?;
        self.write(move |conn| {
            let tx = conn.transaction().map_err(io)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO requests (id, time_ms, day, consumer, deployment, model, operation,
                            status, input_tokens, cached_input_tokens, output_tokens, total_tokens,
                            estimated, cost, doc, unpriced)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                         ON CONFLICT(id) DO UPDATE SET time_ms = excluded.time_ms, day = excluded.day,
                            consumer = excluded.consumer, deployment = excluded.deployment,
                            model = excluded.model, operation = excluded.operation,
                            status = excluded.status, input_tokens = excluded.input_tokens,
                            cached_input_tokens = excluded.cached_input_tokens,
                            output_tokens = excluded.output_tokens,
                            total_tokens = excluded.total_tokens, estimated = excluded.estimated,
                            cost = excluded.cost, doc = excluded.doc,
                            unpriced = excluded.unpriced",
                    )
                    .map_err(io)?;
                for r in &rows {
                    stmt.execute(params![
                        r.id,
                        r.time_ms,
                        r.day,
                        r.consumer,
                        r.deployment,
                        r.model,
                        r.operation,
                        r.status,
                        r.input as i64,
                        r.cached as i64,
                        r.output as i64,
                        r.total as i64,
                        r.estimated,
                        r.cost,
                        r.doc,
                        r.unpriced
                    ])
                    .map_err(io)?;
                }
            }
            tx.commit().map_err(io)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<ConsolidatedRecord>, StoreError> {
        let id = id.to_owned();
        let doc = self
            .read_conn(move |conn| {
                conn.query_row("SELECT doc FROM requests WHERE id = ?1", params![id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
                .map_err(io)
            })
            .await?;
        doc.map(|d| serde_json::from_str(&d).map_err(corrupt))
            .transpose()
    }

    async fn list(&self, query: &RecordQuery) -> Result<Vec<ConsolidatedRecord>, StoreError> {
        let (clause, params) = filters(query);
        let limit = query
            .limit
            .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let docs = self
            .read_conn(move |conn| {
                let sql = format!(
                    "SELECT doc FROM requests WHERE {clause} ORDER BY time_ms DESC, id LIMIT {limit}"
                );
                let mut stmt = conn.prepare(&sql).map_err(io)?;
                let docs = stmt
                    .query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(0))
                    .map_err(io)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(io)?;
                Ok(docs)
            })
            .await?;
        docs.iter()
            .map(|d| serde_json::from_str(d).map_err(corrupt))
            .collect()
    }

    async fn usage(&self, query: &RecordQuery) -> Result<Vec<UsageRow>, StoreError> {
        let (clause, params) = filters(query);
        self.read_conn(move |conn| {
            let sql = format!(
                "SELECT consumer, deployment, model, day, COUNT(*),
                        SUM(CASE WHEN status IS NULL OR status >= 400
                                   OR json_extract(doc, '$.truncated') = 1
                                   OR json_extract(doc, '$.complete') = 0
                                 THEN 1 ELSE 0 END),
                        SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
                        SUM(total_tokens),
                        -- usage quality from the record (older records: the estimated flag)
                        SUM(CASE WHEN json_extract(doc, '$.usageQuality.quality') IS NULL
                                 THEN estimated
                                 ELSE json_extract(doc, '$.usageQuality.quality') = 'estimated'
                            END),
                        SUM(json_extract(doc, '$.usageQuality.quality') = 'reportedAfterInjection'),
                        SUM(json_extract(doc, '$.usageQuality.quality') = 'lowerBound'),
                        SUM(json_extract(doc, '$.usageQuality.quality') = 'unknown'),
                        SUM(COALESCE(json_extract(doc, '$.usage.reasoningTokens'), 0)),
                        -- each row's cost as whole nano-units, so the sum is exact
                        SUM(CAST(ROUND(cost * 1000000000.0) AS INTEGER)), SUM(unpriced),
                        COALESCE(json_extract(doc, '$.backend'), '') AS backend,
                        SUM(CASE WHEN status = 429 THEN 1 ELSE 0 END)
                 FROM requests WHERE {clause}
                 GROUP BY consumer, deployment, model, backend, day
                 ORDER BY day, consumer, deployment, model, backend"
            );
            let mut stmt = conn.prepare(&sql).map_err(io)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params), |r| {
                    Ok(UsageRow {
                        consumer: r.get(0)?,
                        deployment: r.get(1)?,
                        model: r.get(2)?,
                        day: r.get(3)?,
                        requests: r.get::<_, i64>(4)? as u64,
                        errors: r.get::<_, i64>(5)? as u64,
                        input_tokens: r.get::<_, i64>(6)? as u64,
                        cached_input_tokens: r.get::<_, i64>(7)? as u64,
                        output_tokens: r.get::<_, i64>(8)? as u64,
                        total_tokens: r.get::<_, i64>(9)? as u64,
                        estimated_requests: r.get::<_, i64>(10)? as u64,
                        injected_requests: r.get::<_, Option<i64>>(11)?.unwrap_or(0) as u64,
                        lower_bound_requests: r.get::<_, Option<i64>>(12)?.unwrap_or(0) as u64,
                        unknown_usage_requests: r.get::<_, Option<i64>>(13)?.unwrap_or(0) as u64,
                        reasoning_tokens: r.get::<_, i64>(14)? as u64,
                        cost: Money::from_nanos(r.get(15)?),
                        unpriced_requests: r.get::<_, i64>(16)? as u64,
                        backend: r.get(17)?,
                        throttled_requests: r.get::<_, i64>(18)? as u64,
                    })
                })
                .map_err(io)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io)?;
            Ok(rows)
        })
        .await
    }
}

fn stored_consumer(
    (id, version, doc): (String, i64, String),
) -> Result<StoredConsumer, StoreError> {
    Ok(StoredConsumer {
        id,
        version: version.to_string(),
        document: serde_json::from_str(&doc).map_err(corrupt)?,
    })
}

#[async_trait]
impl ConsumerRegistry for EmbeddedStore {
    async fn consumers(&self) -> Result<Vec<StoredConsumer>, StoreError> {
        let rows = self
            .read_conn(|conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT id, version, doc FROM consumers ORDER BY id")
                    .map_err(io)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(io)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(io)?;
                Ok(rows)
            })
            .await?;
        rows.into_iter().map(stored_consumer).collect()
    }

    async fn consumer(&self, id: &str) -> Result<Option<StoredConsumer>, StoreError> {
        let id = id.to_owned();
        let row = self
            .read_conn(move |conn| {
                conn.query_row(
                    "SELECT id, version, doc FROM consumers WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(io)
            })
            .await?;
        row.map(stored_consumer).transpose()
    }

    async fn put_consumer(
        &self,
        id: &str,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let text = serde_json::to_string(document).map_err(corrupt)?;
        let id = id.to_owned();
        // A version this store never wrote cannot match: the write fails as a stale one does.
        let expected = match expected.map(str::parse::<i64>) {
            Some(Err(_)) => return Ok(None),
            Some(Ok(v)) => Some(v),
            None => None,
        };
        self.write(move |conn| {
            let (changed, version) = match expected {
                None => (
                    conn.execute(
                        "INSERT OR IGNORE INTO consumers (id, version, doc) VALUES (?1, 1, ?2)",
                        params![id, text],
                    )
                    .map_err(io)?,
                    1,
                ),
                Some(v) => (
                    conn.execute(
                        "UPDATE consumers SET version = ?3, doc = ?2 WHERE id = ?1 AND version = ?4",
                        params![id, text, v + 1, v],
                    )
                    .map_err(io)?,
                    v + 1,
                ),
            };
            Ok((changed == 1).then(|| version.to_string()))
        })
        .await
    }
}
