//! The HTTP surface and its layer stack.
//!
//! Layers, outermost first (request order):
//! 1. `CatchPanicLayer` — a panic in a handler becomes a 500 instead of a dropped connection.
//! 2. `SetSensitiveRequestHeadersLayer` — marks `api-key`, `Authorization`, `Cookie` sensitive
//!    so no `Debug`/trace output prints them.
//! 3. routes: `/healthz`, `/readyz` (unauthenticated), `/tollgate/admin/flush` (admin key), and
//!    everything else to `forward::handle`, which runs the request phases (admit, auth, body
//!    limit, record, route, forward, tee) in order — see its module doc.
//!
//! Extensions read: `ConnectInfo<SocketAddr>` (client ip) when served with connect info.

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
use crate::forward;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let sensitive = [
        header::AUTHORIZATION,
        header::COOKIE,
        header::HeaderName::from_static("api-key"),
    ];
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/tollgate/admin/flush", post(flush))
        .fallback(forward::handle)
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

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.recorder.can_accept() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "recorder full"})),
        )
            .into_response()
    }
}

/// Waits until every request so far is recorded and, when a hook is set (`tollgate up`), the
/// parser has consolidated it.
async fn flush(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let Some(admin) = app.config.admin_key else {
        return ProxyError::RouteNotFound.into_response();
    };
    let entries = [("admin".to_owned(), admin)];
    let allowed = auth::presented_key(&headers)
        .and_then(|k| auth::find(&entries, k))
        .is_some();
    if !allowed {
        return ProxyError::ConsumerKeyInvalid.into_response();
    }
    app.recorder.flush().await;
    if let Some(hook) = &app.after_flush {
        hook().await;
    }
    Json(json!({"status": "flushed"})).into_response()
}
