//! The consumer API on the admin listener: the registry's operations (`consumers/registry.rs`)
//! over HTTP, JSON in and out with the field names of the configuration file.
//!
//! | call | does |
//! |---|---|
//! | `GET /tollgate/admin/consumers[?deleted=true]` | every consumer, the file's and the registry's |
//! | `POST /tollgate/admin/consumers` | creates one: `{"id", …fields, "key_expires"}` → 201 with its key |
//! | `GET /tollgate/admin/consumers/{id}` | one registered consumer with its history |
//! | `PATCH /tollgate/admin/consumers/{id}` | changes `display_name`, `owner`, `deployments`, `limits`, `deployment_limits` |
//! | `DELETE /tollgate/admin/consumers/{id}` | deletes it (its keys stop working) |
//! | `POST /tollgate/admin/consumers/{id}/keys` | a second key: `{"name", "expires"}` → 201 with the key |
//! | `POST /tollgate/admin/consumers/{id}/keys/rotate` | a new primary; the old one works `grace_s` more (default a day) |
//! | `DELETE /tollgate/admin/consumers/{id}/keys/{key_id}` | revokes a key now |
//! | `GET /tollgate/admin/audit[?limit=N]` | the changes, newest first |
//!
//! A change is applied to this replica at once; the others read it at their next poll.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::consumers::registry::{ConsumerFields, Registry, RegistryError};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/tollgate/admin/consumers", get(list).post(create))
        .route(
            "/tollgate/admin/consumers/{id}",
            get(show).patch(update).delete(delete),
        )
        .route("/tollgate/admin/consumers/{id}/keys", post(add_key))
        .route("/tollgate/admin/consumers/{id}/keys/rotate", post(rotate))
        .route(
            "/tollgate/admin/consumers/{id}/keys/{key_id}",
            axum::routing::delete(revoke),
        )
        .route("/tollgate/admin/audit", get(audit))
}

const DEFAULT_GRACE_S: i64 = 24 * 3600;

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn refused(e: RegistryError) -> Response {
    let (status, code) = match &e {
        RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
        RegistryError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
        RegistryError::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
        RegistryError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "RegistryUnavailable"),
    };
    error(status, code, e.to_string())
}

/// Runs `op` on the registry as the calling administrator; after a change (`writes`), applies
/// the registry to this replica at once.
async fn with_registry<T, F>(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    writes: bool,
    op: F,
) -> Response
where
    T: serde::Serialize,
    F: AsyncFnOnce(&Registry<'_>) -> Result<(StatusCode, T), RegistryError>,
{
    let actor = match super::actor(app, headers).await {
        Ok(a) => a,
        Err(denied) => return denied,
    };
    let Some(store) = app.registry.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "RegistryUnavailable",
            "this process has no consumer registry (it was started without a store)".to_owned(),
        );
    };
    let live = app.live.load_full();
    let registry = Registry::new(store.as_ref(), &live.config.file_consumers, actor);
    match op(&registry).await {
        Ok((status, body)) => {
            if writes && let Err(e) = crate::consumers::poll::refresh(app, store.as_ref()).await {
                tracing::warn!(error = %e, "The registry change is stored; this replica applies it at its next poll.");
            }
            (status, Json(body)).into_response()
        }
        Err(e) => refused(e),
    }
}

/// The value of `name` in a query string (`deleted=true`, `limit=20`).
fn param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
}

async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    with_registry(&app, &headers, false, async |r: &Registry<'_>| {
        let deleted = param(q.as_deref(), "deleted") == Some("true");
        Ok((StatusCode::OK, json!({"data": r.list(deleted).await?})))
    })
    .await
}

/// A new consumer: its id, the key's expiry, and [`ConsumerFields`] (listed again: serde's
/// `flatten` does not work with `deny_unknown_fields`, and a misspelt limit must be refused,
/// not ignored).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConsumer {
    id: String,
    #[serde(default)]
    key_expires: Option<DateTime<Utc>>,
    display_name: Option<String>,
    owner: Option<String>,
    deployments: Option<Vec<String>>,
    limits: Option<crate::quota::ConsumerLimits>,
    deployment_limits: Option<std::collections::BTreeMap<String, crate::quota::ConsumerLimits>>,
}

/// The body as `T` (an empty body as `{}`), or what is wrong with it. Read inside the
/// registry call, so a caller without credentials learns nothing from a 400.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RegistryError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Invalid(vec![e.to_string()]))
}

async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        let new: NewConsumer = body(&bytes)?;
        let fields = ConsumerFields {
            display_name: new.display_name,
            owner: new.owner,
            deployments: new.deployments,
            limits: new.limits,
            deployment_limits: new.deployment_limits,
        };
        let (doc, issued) = r.create(&new.id, fields, new.key_expires).await?;
        Ok((
            StatusCode::CREATED,
            json!({"consumer": doc.consumer.id, "key": issued.key, "key_id": issued.key_id}),
        ))
    })
    .await
}

async fn show(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_registry(&app, &headers, false, async |r: &Registry<'_>| {
        Ok((StatusCode::OK, r.show(&id).await?))
    })
    .await
}

async fn update(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        let fields: ConsumerFields = body(&bytes)?;
        let doc = r.update(&id, fields).await?;
        Ok((StatusCode::OK, json!({"consumer": doc.consumer.id})))
    })
    .await
}

async fn delete(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        r.delete(&id).await?;
        Ok((StatusCode::OK, json!({"consumer": id, "deleted": true})))
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    expires: Option<DateTime<Utc>>,
}

async fn add_key(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        let new: NewKey = body(&bytes)?;
        let (_, issued) = r.add_key(&id, new.name, new.expires).await?;
        Ok((StatusCode::CREATED, issued))
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotation {
    #[serde(default)]
    grace_s: Option<i64>,
    #[serde(default)]
    expires: Option<DateTime<Utc>>,
}

async fn rotate(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        let rotation: Rotation = body(&bytes)?;
        let grace = chrono::Duration::try_seconds(rotation.grace_s.unwrap_or(DEFAULT_GRACE_S))
            .ok_or_else(|| RegistryError::Invalid(vec!["grace_s is out of range".to_owned()]))?;
        let (_, issued) = r.rotate(&id, grace, rotation.expires).await?;
        Ok((StatusCode::CREATED, issued))
    })
    .await
}

async fn revoke(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, key_id)): Path<(String, String)>,
) -> Response {
    with_registry(&app, &headers, true, async |r: &Registry<'_>| {
        r.revoke(&id, &key_id).await?;
        Ok((StatusCode::OK, json!({"consumer": id, "revoked": key_id})))
    })
    .await
}

/// Audit entries a call returns unless `limit` says otherwise, and at most.
const AUDIT_DEFAULT: usize = 100;
const AUDIT_MAX: usize = 10_000;

async fn audit(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    with_registry(&app, &headers, false, async |r: &Registry<'_>| {
        let limit = match param(q.as_deref(), "limit") {
            Some(l) => l.parse::<usize>().map_err(|_| {
                RegistryError::Invalid(vec![format!("limit `{l}` is not a number")])
            })?,
            None => AUDIT_DEFAULT,
        };
        Ok((
            StatusCode::OK,
            json!({"data": r.audit(limit.min(AUDIT_MAX)).await?}),
        ))
    })
    .await
}
