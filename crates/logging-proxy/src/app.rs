//! The HTTP surface and its layer stack.
//!
//! Layers, outermost first (request order):
//! 1. `CatchPanicLayer` — a panic in a handler becomes a 500 instead of a dropped connection.
//! 2. `SetSensitiveRequestHeadersLayer` — marks `api-key`, `Authorization`, `Cookie` sensitive
//!    so no `Debug`/trace output prints them.
//! 3. routes: `/healthz`, `/readyz` (unauthenticated), `/tollgate/admin/flush` and
//!    `/tollgate/admin/metrics` (admin key); everything else is the proxy path:
//!    4. `layers::context` — request id and start time; `x-tollgate-request-id` on every answer;
//!    5. `layers::http_limits` — canonical path, header size, concurrency slot;
//!    6. `layers::authenticate` — the consumer;
//!    7. `phases::handle` — admit, read body, describe, route, forward, tee (see `phases.rs`).
//!
//! Extensions read: `ConnectInfo<SocketAddr>` (client ip), set by `server.rs`.
//! Extensions added on the proxy path: `RequestInfo`, `Route`, the slot, `Consumer`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::AppState;
use crate::auth;
use crate::error::ProxyError;
use crate::{layers, phases};

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let sensitive = [
        header::AUTHORIZATION,
        header::COOKIE,
        header::HeaderName::from_static("api-key"),
    ];
    // Innermost layer first: `authenticate` runs after `http_limits`, which runs after
    // `context`.
    let proxy_path = Router::new()
        .fallback(phases::handle)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            layers::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            layers::http_limits,
        ))
        .layer(axum::middleware::from_fn(layers::context))
        .with_state(state.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/tollgate/admin/flush", post(flush))
        .route("/tollgate/admin/metrics", get(metrics))
        .route("/tollgate/admin/backends", get(backends))
        .route("/tollgate/admin/reload", post(reload))
        .fallback_service(proxy_path)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::new())
                .layer(SetSensitiveRequestHeadersLayer::new(sensitive)),
        )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when requests can be recorded, the shared limits store answers (when limits fail
/// closed), and every deployment has a backend that may take one now (not resting after a
/// 429, its breaker not open): a load balancer then sends traffic to replicas that can serve
/// it.
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if !app.recorder.can_accept() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "recorder full"})),
        )
            .into_response();
    }
    // Limits that fail closed refuse every limited consumer while their store is down; the
    // probe asks again, so a replica taken out of rotation sees the store come back.
    if let Some((true, true, _)) = app.counters.store_state()
        && !app.counters.probe().await
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "limits store unavailable"})),
        )
            .into_response();
    }
    let live = app.live.load();
    let mut unavailable: Vec<&String> = live
        .config
        .routes
        .iter()
        .filter(|(_, pool)| {
            !pool
                .iter()
                .any(|&i| live.state.get(i).is_some_and(|s| app.pools.eligible(s)))
        })
        .map(|(deployment, _)| deployment)
        .collect();
    if unavailable.is_empty() {
        return Json(json!({"status": "ready"})).into_response();
    }
    unavailable.sort();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "no backend available", "deployments": unavailable})),
    )
        .into_response()
}

/// The admin endpoints exist only with an admin key configured, and answer only to it.
fn admin_denied(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(admin) = app.config.admin_key else {
        return Some(ProxyError::RouteNotFound.into_response());
    };
    let entries = [auth::KeyEntry {
        consumer: "admin".to_owned(),
        digest: admin,
        expires: None,
    }];
    let allowed = auth::presented_key(headers)
        .and_then(|k| auth::find(&entries, k))
        .is_some();
    (!allowed).then(|| ProxyError::ConsumerKeyInvalid.into_response())
}

/// The recorder's counters in the Prometheus text format.
async fn metrics(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    if let Some(denied) = admin_denied(&app, &headers) {
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
async fn flush(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
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
async fn backends(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
        return denied;
    }
    Json(json!({"backends": app.pools.describe(&app.live.load())})).into_response()
}

/// Reads the configuration again and applies its consumers, backends and `stream_usage`
/// (see `live.rs`); 409 with the reasons when it is refused, changing nothing.
async fn reload(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
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
