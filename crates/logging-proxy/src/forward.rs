//! The request path, as named phases run in order for every `/openai/…` request:
//! admit (recorder has room) → authenticate → read the body (bounded) → record the request →
//! route (deployment → backend) → forward → tee the response. Every request that got past
//! admission ends with exactly one `end` record, whether Tollgate answered it itself or the
//! backend did.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tollgate_records::{
    Attempt, Body as RecordBody, Consumer, EndRecord, ErrorInfo, RawRecord, RequestRecord,
    SCHEMA_VERSION,
};

use crate::AppState;
use crate::auth;
use crate::error::ProxyError;
use crate::recorder::InFlight;
use crate::tee::{self, Exchange, millis};

/// Response header carrying Tollgate's request id.
pub const REQUEST_ID_HEADER: &str = "x-tollgate-request-id";

const REDACTED: &str = "[redacted]";

/// Headers whose values are credentials and never leave the process.
const SECRET_HEADERS: &[&str] = &[
    "api-key",
    "authorization",
    "cookie",
    "set-cookie",
    "ocp-apim-subscription-key",
    "x-api-key",
    "proxy-authorization",
];

/// Connection-scoped headers (RFC 9110 §7.6.1) plus those reqwest/hyper set themselves.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

pub(crate) fn redacted_headers(headers: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            let value = if SECRET_HEADERS.contains(&k.as_str()) {
                REDACTED.to_owned()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (k.as_str().to_owned(), value)
        })
        .collect()
}

/// Parsed `/openai/…` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub deployment: Option<String>,
    pub operation: String,
    /// The v1 surface names the deployment in the body's `model`.
    pub v1: bool,
}

pub(crate) fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/openai/")?;
    let op_name = |op: &str| op.trim_matches('/').replace('/', ".");
    if let Some(rest) = rest.strip_prefix("deployments/") {
        let (deployment, op) = rest.split_once('/').unwrap_or((rest, ""));
        return Some(Route {
            deployment: Some(deployment.to_owned()),
            operation: op_name(op),
            v1: false,
        });
    }
    if let Some(op) = rest.strip_prefix("v1/") {
        return Some(Route {
            deployment: None,
            operation: op_name(op),
            v1: true,
        });
    }
    Some(Route {
        deployment: None,
        operation: op_name(rest),
        v1: false,
    })
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

struct Recording {
    request_id: String,
    started: Instant,
    inflight: InFlight,
}

impl Recording {
    /// Ends a request Tollgate answered itself: records the `end` and renders the error.
    async fn reject(self, app: &AppState, error: ProxyError, attempts: Vec<Attempt>) -> Response {
        let info: ErrorInfo = error.info();
        let status = error.status().as_u16();
        let response = error.into_response();
        let end = EndRecord {
            schema_version: SCHEMA_VERSION,
            request_id: self.request_id.clone(),
            seq: 1,
            time: Utc::now(),
            status,
            backend: attempts.last().map(|a| a.backend.clone()),
            attempts,
            ttfb_ms: None,
            total_ms: millis(self.started.elapsed()),
            headers: Default::default(),
            content_type: Some("application/json".into()),
            body: RecordBody::Empty,
            client_disconnected: false,
            truncated: false,
            error: Some(info),
            segments: 0,
            response_bytes: 0,
        };
        app.recorder.record(RawRecord::End(end)).await;
        drop(self.inflight);
        with_request_id(response, &self.request_id)
    }
}

pub(crate) async fn handle(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let time = Utc::now();
    let (parts, body) = request.into_parts();
    let Some(route) = parse_route(parts.uri.path()) else {
        return ProxyError::RouteNotFound.into_response();
    };
    if !app.recorder.can_accept() {
        return ProxyError::RecorderFull.into_response();
    }
    let request_id = uuid::Uuid::now_v7().to_string();
    let recording = Recording {
        request_id: request_id.clone(),
        started,
        inflight: app.recorder.begin(),
    };

    let consumer = auth::authenticate(&app.config.consumers, &parts.headers);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = parts.uri.query().map(str::to_owned);
    let api_version = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("api-version="))
            .map(str::to_owned)
    });
    let client_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut record = RequestRecord {
        schema_version: SCHEMA_VERSION,
        request_id: request_id.clone(),
        time,
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: query.clone(),
        deployment: route.deployment.clone(),
        api_version,
        operation: route.operation.clone(),
        stream: false,
        consumer: consumer.clone().unwrap_or_else(Consumer::anonymous),
        client_ip,
        user_agent,
        headers: redacted_headers(&parts.headers),
        body: RecordBody::Empty,
    };
    if consumer.is_none() {
        app.recorder.record(RawRecord::Request(record)).await;
        return recording
            .reject(&app, ProxyError::ConsumerKeyInvalid, vec![])
            .await;
    }
    let header_limit = app.config.limits.max_header_bytes;
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.as_bytes().len())
        .sum();
    if header_bytes > header_limit {
        record.headers.clear();
        app.recorder.record(RawRecord::Request(record)).await;
        let error = ProxyError::RequestHeadersTooLarge {
            limit: header_limit,
        };
        return recording.reject(&app, error, vec![]).await;
    }

    let limit = app.config.limits.max_request_body_bytes;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            app.recorder.record(RawRecord::Request(record)).await;
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let error = if too_large {
                ProxyError::RequestBodyTooLarge { limit }
            } else {
                ProxyError::RequestBodyUnreadable(e.to_string())
            };
            return recording.reject(&app, error, vec![]).await;
        }
    };
    record.body = RecordBody::from_bytes(content_type.as_deref(), &bytes);
    if let RecordBody::Json { json } = &record.body
        && let Ok(peek) = serde_json::from_str::<Peek<'_>>(json.as_str())
    {
        record.stream = peek.stream.unwrap_or(false);
        if route.v1 {
            record.deployment = peek.model.map(|m| m.into_owned());
        }
    }
    let deployment = record.deployment.clone();
    app.recorder.record(RawRecord::Request(record)).await;

    let backend = match &deployment {
        Some(d) => app.config.routes.get(d).map(|&i| &app.config.backends[i]),
        // Paths without a deployment (files, batches, …) go to the first backend.
        None => app.config.backends.first(),
    };
    let Some(backend) = backend else {
        let error = if deployment.is_some() {
            ProxyError::DeploymentNotFound
        } else {
            ProxyError::RouteNotFound
        };
        return recording.reject(&app, error, vec![]).await;
    };

    let url = match &query {
        Some(q) => format!("{}{}?{q}", backend.endpoint, parts.uri.path()),
        None => format!("{}{}", backend.endpoint, parts.uri.path()),
    };
    let mut upstream_headers = HeaderMap::with_capacity(parts.headers.len());
    for (k, v) in &parts.headers {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name)
            || SECRET_HEADERS.contains(&name)
            // Recorded bytes must be parseable, so ask the backend for an identity encoding.
            || name == "accept-encoding"
        {
            continue;
        }
        upstream_headers.append(k.clone(), v.clone());
    }
    if let Some(key) = &backend.api_key
        && let Ok(v) = HeaderValue::from_str(key.expose_secret())
    {
        let mut v = v;
        v.set_sensitive(true);
        upstream_headers.insert(HeaderName::from_static("api-key"), v);
    }

    let attempt_started = Instant::now();
    let send = app
        .client
        .request(parts.method.clone(), &url)
        .headers(upstream_headers)
        .body(reqwest::Body::from(bytes))
        .send();
    let first_byte = Duration::from_millis(app.config.limits.first_byte_timeout_ms);
    let result = tokio::time::timeout(first_byte, send).await;
    let attempt_ms = millis(attempt_started.elapsed());
    let failure = match result {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err((
            e.to_string(),
            ProxyError::BackendUnreachable {
                detail: e.to_string(),
            },
        )),
        Err(_) => {
            let timeout_ms = app.config.limits.first_byte_timeout_ms;
            Err((
                "first byte timeout".to_owned(),
                ProxyError::BackendTimeout { timeout_ms },
            ))
        }
    };
    let upstream = match failure {
        Ok(resp) => resp,
        Err((detail, error)) => {
            let attempt = Attempt {
                backend: backend.name.clone(),
                status: None,
                duration_ms: attempt_ms,
                retry_after_ms: None,
                error: Some(detail),
            };
            return recording.reject(&app, error, vec![attempt]).await;
        }
    };

    let status = upstream.status();
    let response_headers = upstream.headers().clone();
    let attempt = Attempt {
        backend: backend.name.clone(),
        status: Some(status.as_u16()),
        duration_ms: attempt_ms,
        retry_after_ms: retry_after_ms(&response_headers),
        error: None,
    };
    let exchange = Exchange {
        request_id: request_id.clone(),
        started,
        status: status.as_u16(),
        backend: backend.name.clone(),
        attempts: vec![attempt],
        ttfb_ms: millis(started.elapsed()),
        headers: tee::selected_headers(&response_headers),
        content_type: response_headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        inflight: recording.inflight,
    };
    let body = tee::TeeBody::new(
        upstream,
        exchange,
        app.recorder.clone(),
        app.requests.clone(),
        app.config.limits.clone(),
        &app.config.recorder,
    );
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() =
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let out = response.headers_mut();
    for (k, v) in &response_headers {
        if HOP_BY_HOP.contains(&k.as_str()) && k != header::CONTENT_LENGTH {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    with_request_id(response, &request_id)
}

/// The two fields of a request body the proxy needs, read without building the whole document.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
}

/// The backend's requested back-off: `retry-after-ms`, `x-ms-retry-after-ms`, then
/// `Retry-After` in seconds.
fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    get("retry-after-ms")
        .or_else(|| get("x-ms-retry-after-ms"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| ms as u64)
        .or_else(|| {
            get("retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|s| (s * 1000.0) as u64)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = parse_route("/openai/deployments/gpt-4o/chat/completions").unwrap();
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(r.operation, "chat.completions");
        let r = parse_route("/openai/v1/embeddings").unwrap();
        assert!(r.v1);
        assert_eq!(r.operation, "embeddings");
        let r = parse_route("/openai/files").unwrap();
        assert_eq!((r.deployment, r.operation.as_str()), (None, "files"));
        assert!(parse_route("/other").is_none());
    }

    #[test]
    fn secrets_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("s3cret"));
        h.insert("authorization", HeaderValue::from_static("Bearer s3cret"));
        h.insert("cookie", HeaderValue::from_static("a=s3cret"));
        h.insert("x-custom", HeaderValue::from_static("fine"));
        let r = redacted_headers(&h);
        assert!(r.values().all(|v| !v.contains("s3cret")));
        assert_eq!(r["x-custom"], "fine");
    }

    #[test]
    fn retry_after_prefers_ms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after_ms(&h), Some(2000));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after_ms(&h), Some(150));
    }
}
