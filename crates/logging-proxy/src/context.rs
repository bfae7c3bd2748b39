//! The per-request context: created by the outermost proxy layer, carried in the request's
//! extensions through the layers, then owned by the phases (Pingora's per-request `CTX`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method};
use chrono::{DateTime, Utc};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tollgate_records::{Body as RecordBody, Consumer, RequestRecord, SCHEMA_VERSION};

use crate::headers;
use crate::path::{self, Route};

/// Response header carrying Tollgate's request id.
pub const REQUEST_ID_HEADER: &str = "x-tollgate-request-id";

/// What every layer and phase knows about a request from its first byte on.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub request_id: Arc<str>,
    pub started: Instant,
    pub time: DateTime<Utc>,
}

impl RequestInfo {
    pub(crate) fn new() -> Self {
        RequestInfo {
            request_id: uuid::Uuid::now_v7().to_string().into(),
            started: Instant::now(),
            time: Utc::now(),
        }
    }

    pub(crate) fn header_value(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.request_id).ok()
    }
}

/// A slot of the global concurrency limit, held until the request's `end` is handed over.
pub(crate) struct Slot(#[expect(dead_code, reason = "held for its Drop")] pub OwnedSemaphorePermit);

/// How the limits layer hands the slot to the phases: request extensions must be `Clone`.
pub(crate) type SlotCell = Arc<std::sync::Mutex<Option<Slot>>>;

/// The request as the phases see it once the layers let it through.
pub(crate) struct Ctx {
    pub info: RequestInfo,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub client_ip: Option<String>,
    pub route: Route,
    pub consumer: Consumer,
    pub slot: Option<Slot>,
}

impl Ctx {
    /// The `request` record's fields known before the body is read; every header is kept,
    /// credentials redacted (a refused request keeps only a summary, see `reject.rs`).
    pub(crate) fn request_record(&self) -> RequestRecord {
        let query = self.query.as_deref();
        RequestRecord {
            schema_version: SCHEMA_VERSION,
            request_id: self.info.request_id.to_string(),
            time: self.info.time,
            method: self.method.as_str().to_owned(),
            path: self.path.clone(),
            query: query.map(path::redacted_query),
            deployment: self.route.deployment.clone(),
            api_version: query
                .and_then(|q| path::query_param(q, "api-version"))
                .map(str::to_owned),
            operation: self.route.operation.clone(),
            stream: false,
            consumer: self.consumer.clone(),
            client_ip: self.client_ip.clone(),
            user_agent: self
                .headers
                .get(axum::http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            headers: headers::redacted(&self.headers),
            body: RecordBody::Empty,
        }
    }
}

/// Builds the context from the parts the layers prepared; `None` when a layer did not run
/// (the router is mis-assembled), which the caller answers with a 500.
pub(crate) fn from_parts(parts: &mut Parts) -> Option<Ctx> {
    let info = parts.extensions.remove::<RequestInfo>()?;
    let route = parts.extensions.remove::<Route>()?;
    // Each of these is put there by a layer; one missing means the layers are mis-ordered,
    // and the request must not be served unauthenticated or unlimited.
    let consumer = parts.extensions.remove::<Consumer>()?;
    let slot = parts.extensions.remove::<SlotCell>()?;
    Some(Ctx {
        client_ip: client_ip(parts),
        info,
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: std::mem::take(&mut parts.headers),
        route,
        consumer,
        slot: slot.lock().ok()?.take(),
    })
}

pub(crate) fn client_ip(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
}
