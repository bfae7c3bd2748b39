//! The HTTP surface and its layer stack.
//!
//! Layers, outermost first (request order):
//! 1. `CatchPanicLayer` — a panic in a handler becomes a 500 instead of a dropped connection.
//! 2. `SetSensitiveRequestHeadersLayer` — marks `api-key`, `Authorization`, `Cookie` sensitive
//!    so no `Debug`/trace output prints them.
//! 3. routes: `/healthz`, `/readyz` (unauthenticated), the admin endpoints (`admin/`: flush,
//!    metrics, backends, reload; the consumer API only on the admin listener); everything else
//!    is the proxy path:
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
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::AppState;
use crate::{admin, layers, phases};

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
        .merge(admin::endpoints())
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
