//! The admin surface: who may use it ([`actor`]), the endpoints every listener serves to the
//! admin (`endpoints.rs`), and the consumer API (`consumers.rs`), served only on the admin
//! listener (`[proxy.admin] listen`, off by default) so the proxy's public address never
//! issues keys.
//!
//! An administrator presents the admin key (`proxy.admin_key_sha256`, compared in constant
//! time) or, with `[proxy.admin] entra_role`, an Entra ID token valid for
//! `[proxy.entra_callers]` whose `roles` claim holds that role. The actor's name (the admin
//! key's id, or the token's object id) goes into the consumer registry's audit entries.

mod consumers;
mod endpoints;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::AppState;
use crate::auth;
use crate::error::ProxyError;

/// The admin endpoints, for the proxy's listener and the admin listener alike.
pub(crate) fn endpoints() -> Router<Arc<AppState>> {
    Router::new()
        .route("/tollgate/admin/flush", post(endpoints::flush))
        .route("/tollgate/admin/metrics", get(endpoints::metrics))
        .route("/tollgate/admin/backends", get(endpoints::backends))
        .route("/tollgate/admin/reload", post(endpoints::reload))
}

/// The admin listener's router: the endpoints and the consumer API.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let sensitive = [
        header::AUTHORIZATION,
        header::COOKIE,
        header::HeaderName::from_static("api-key"),
    ];
    endpoints()
        .merge(consumers::routes())
        .fallback(|| async { ProxyError::RouteNotFound.into_response() })
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::new())
                .layer(SetSensitiveRequestHeadersLayer::new(sensitive)),
        )
}

/// Who is calling, when it is an administrator: `admin-key:{id}` or `entra:{tenant}/{object
/// id}`.
/// Otherwise the answer to give: 404 when no admin credential is configured (the endpoints do
/// not exist), 401 for a wrong or missing credential, 403 for a valid token without the role.
pub(crate) async fn actor(app: &AppState, headers: &HeaderMap) -> Result<String, Response> {
    let role = app.config.admin.entra_role.as_deref();
    if app.config.admin_key.is_none() && role.is_none() {
        return Err(ProxyError::RouteNotFound.into_response());
    }
    let Some(presented) = auth::presented_key(headers) else {
        return Err(ProxyError::ConsumerKeyInvalid.into_response());
    };
    if let Some(admin) = app.config.admin_key {
        let entries = [auth::KeyEntry {
            consumer: "admin".to_owned(),
            digest: admin,
            expires: None,
        }];
        if auth::find(&entries, presented).is_some() {
            return Ok(format!("admin-key:{}", hex::encode(&admin[..4])));
        }
    }
    let Some(role) = role.filter(|_| presented.split('.').count() == 3) else {
        return Err(ProxyError::ConsumerKeyInvalid.into_response());
    };
    let claims = app.callers.validate(presented).await.map_err(|rejected| {
        let reason = match rejected {
            crate::entra_callers::Rejected::Invalid(r) => r,
            crate::entra_callers::Rejected::Unmapped => "unmapped".to_owned(),
        };
        ProxyError::CallerTokenInvalid { reason }.into_response()
    })?;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let tenant = text("tid").unwrap_or_default();
    if !app.config.admin.tenants.iter().any(|t| t == tenant) {
        return Err(ProxyError::CallerNotMapped.into_response());
    }
    let has_role = claims
        .get("roles")
        .and_then(Value::as_array)
        .is_some_and(|roles| roles.iter().any(|r| r.as_str() == Some(role)));
    if !has_role {
        return Err(ProxyError::CallerNotMapped.into_response());
    }
    let who = text("oid").or_else(|| text("sub")).unwrap_or("unknown");
    Ok(format!("entra:{tenant}/{who}"))
}
