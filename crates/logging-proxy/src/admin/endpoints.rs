//! The admin endpoints every listener serves to the admin: flush, metrics, backends, reload.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;

/// The recorder's counters in the Prometheus text format.
pub(super) async fn metrics(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    if let Err(denied) = super::actor(&app, &headers).await {
        return denied;
    }
    let r = &app.recorder;
    let s = r.stats();
    let p = &app.stats;
    let mut rows: Vec<(&str, &str, &str, u64)> = vec![
        (
            "tollgate_recorder_records_enqueued_total",
            "counter",
            "Raw records handed to the recorder.",
            s.enqueued.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_written_total",
            "counter",
            "Raw records the store confirmed.",
            s.written.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_spooled_total",
            "counter",
            "Raw records that went to the on-disk spool.",
            s.spooled.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_replayed_total",
            "counter",
            "Raw records replayed from the spool into the store.",
            s.replayed.load(Relaxed),
        ),
        (
            "tollgate_recorder_store_errors_total",
            "counter",
            "Failed store writes.",
            s.store_errors.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_corrupt_total",
            "counter",
            "Spooled records found corrupt (checksum, torn tail) and dropped.",
            s.corrupt.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_dead_lettered_total",
            "counter",
            "Records the store rejected for good, written to the dead-letter file.",
            s.dead_lettered.load(Relaxed),
        ),
        (
            "tollgate_recorder_spool_write_errors_total",
            "counter",
            "Failed spool writes (the records were kept in memory and retried).",
            s.spool_errors.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_journaled_total",
            "counter",
            "Raw records written to the write-ahead journal.",
            s.journaled.load(Relaxed),
        ),
        (
            "tollgate_recorder_journal_write_errors_total",
            "counter",
            "Failed journal writes (their records' responses were not held for the journal).",
            s.journal_errors.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_unjournaled_total",
            "counter",
            "Raw records not journaled (failed write, journal over its caps); a kill could lose them.",
            s.unjournaled.load(Relaxed),
        ),
        (
            "tollgate_recorder_journal_bytes",
            "gauge",
            "Bytes in the journal files of this run.",
            r.journal_bytes(),
        ),
        (
            "tollgate_recorder_queue_bytes",
            "gauge",
            "Estimated bytes of records in the in-memory queue and the writer's batch.",
            r.queued_bytes(),
        ),
        (
            "tollgate_recorder_overflow_bytes",
            "gauge",
            "Estimated bytes of records waiting in memory because queue and spool were both full.",
            r.overflow_bytes(),
        ),
        (
            "tollgate_recorder_records_overflowed_total",
            "counter",
            "Records that found queue and spool full and waited in memory for room.",
            s.overflowed.load(Relaxed),
        ),
        (
            "tollgate_recorder_records_overflow_lost_total",
            "counter",
            "Records still waiting for room at shutdown and not journaled: lost.",
            s.overflow_lost.load(Relaxed),
        ),
        (
            "tollgate_recorder_spool_bytes",
            "gauge",
            "Bytes waiting in the spool.",
            r.spooled_bytes(),
        ),
        (
            "tollgate_proxy_requests_in_flight",
            "gauge",
            "Requests whose end record is not yet handed over.",
            r.in_flight() as u64,
        ),
        (
            "tollgate_proxy_requests_shed_total",
            "counter",
            "Requests refused with 503 because max_concurrent_requests were in progress.",
            p.shed.load(Relaxed),
        ),
        (
            "tollgate_proxy_refusals_unrecorded_total",
            "counter",
            "Refused requests (no key, bad path, headers too large) not recorded because the spool was in use.",
            p.refusals_unrecorded.load(Relaxed),
        ),
        (
            "tollgate_proxy_connections_refused_total",
            "counter",
            "Connections closed on accept by max_connections or max_connections_per_ip.",
            p.connections_refused.load(Relaxed),
        ),
    ];
    if app.registry.is_some() {
        let status = &app.registry_status;
        rows.push((
            "tollgate_registry_up",
            "gauge",
            "1 while the last read of the consumer registry worked.",
            u64::from(status.up.load(Relaxed)),
        ));
        rows.push((
            "tollgate_registry_errors_total",
            "counter",
            "Reads of the consumer registry that failed (the last consumers read stay in force).",
            status.errors.load(Relaxed),
        ));
    }
    if let Some((down, _, errors)) = app.counters.store_state() {
        rows.push((
            "tollgate_limits_store_up",
            "gauge",
            "1 while the shared limits store (Redis) answers.",
            u64::from(!down),
        ));
        rows.push((
            "tollgate_limits_store_errors_total",
            "counter",
            "Calls to the shared limits store that failed or timed out.",
            errors,
        ));
    }
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    app.pools.write_metrics(&app.live.load(), &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Waits until every request so far is recorded and, when a hook is set (`tollgate up`), the
/// parser has consolidated it.
pub(super) async fn flush(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = super::actor(&app, &headers).await {
        return denied;
    }
    app.recorder.flush().await;
    if let Some(hook) = &app.after_flush {
        hook().await;
    }
    Json(json!({"status": "flushed"})).into_response()
}

/// Each backend's state: healthy, full, resting (and for how long), tripped; requests in
/// flight; smoothed time to headers; the deployments it serves.
pub(super) async fn backends(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = super::actor(&app, &headers).await {
        return denied;
    }
    Json(json!({"backends": app.pools.describe(&app.live.load())})).into_response()
}

/// Reads the configuration again and applies its consumers, backends and `stream_usage`
/// (see `live.rs`); 409 with the reasons when it is refused, changing nothing.
pub(super) async fn reload(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = super::actor(&app, &headers).await {
        return denied;
    }
    let Some(read) = &app.reload else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "this process was not started from a configuration file"})),
        )
            .into_response();
    };
    let outcome = read().and_then(|config| crate::reload(&app, &config).map_err(|e| e.to_string()));
    match outcome {
        Ok(reloaded) => Json(json!({"status": "reloaded", "reloaded": reloaded})).into_response(),
        Err(why) => (
            StatusCode::CONFLICT,
            Json(json!({"status": "refused", "error": why})),
        )
            .into_response(),
    }
}
