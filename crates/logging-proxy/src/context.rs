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
    /// What the limits phase reserved, settled at the request's end.
    pub quota: Option<crate::quota::Hold>,
}

impl Ctx {
    /// The `request` record's fields known before the body is read, every header kept
    /// (credentials redacted).
    pub(crate) fn request_record(&self) -> RequestRecord {
        request_record(
            &RequestSeen {
                info: &self.info,
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                headers: &self.headers,
                client_ip: self.client_ip.clone(),
                route: Some(&self.route),
            },
            self.consumer.clone(),
            Keep::All,
        )
    }
}

/// What a request record is made of, before or after the layers.
pub(crate) struct RequestSeen<'a> {
    pub info: &'a RequestInfo,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub client_ip: Option<String>,
    pub route: Option<&'a Route>,
}

/// How much of a request its record keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// An accepted request: everything, credentials redacted.
    All,
    /// A refused request: a bounded summary, since all of it is the caller's unchecked text.
    Summary,
}

/// How much of a refused request's path, query and user agent is kept.
const SUMMARY_TEXT_BYTES: usize = 1024;

/// The one builder of `request` records (their body is filled in by the describe phase).
pub(crate) fn request_record(
    seen: &RequestSeen<'_>,
    consumer: Consumer,
    keep: Keep,
) -> RequestRecord {
    let text = |t: &str| match keep {
        Keep::All => t.to_owned(),
        Keep::Summary => headers::bounded(t, SUMMARY_TEXT_BYTES),
    };
    RequestRecord {
        schema_version: SCHEMA_VERSION,
        request_id: seen.info.request_id.to_string(),
        time: seen.info.time,
        method: seen.method.as_str().to_owned(),
        path: text(seen.path),
        query: seen.query.map(|q| text(&path::redacted_query(q))),
        deployment: seen.route.and_then(|r| r.deployment.clone()),
        api_version: seen
            .query
            .and_then(|q| path::query_param(q, "api-version"))
            .map(text),
        operation: seen
            .route
            .map_or_else(|| "unknown".to_owned(), |r| r.operation.clone()),
        stream: false,
        consumer,
        client_ip: seen.client_ip.clone(),
        user_agent: seen
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(text),
        headers: match keep {
            Keep::All => headers::redacted(seen.headers),
            Keep::Summary => headers::summary(seen.headers),
        },
        body: RecordBody::Empty,
        stream_usage_injected: false,
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
        quota: None,
    })
}

pub(crate) fn client_ip(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
}
