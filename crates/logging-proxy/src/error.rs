//! Errors Tollgate itself answers with, and the one table that maps each to its HTTP status and
//! AOAI error `code`. Errors AOAI returned are forwarded as received, never through here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_records::{ErrorInfo, ErrorSource};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."
    )]
    ConsumerKeyInvalid,
    /// A bearer JWT that is not a valid Entra ID token for this gateway; the reason is for the
    /// record only.
    #[error("Access token is missing, invalid, audience is incorrect, or have expired.")]
    CallerTokenInvalid { reason: String },
    #[error("The caller's identity is valid but is not allowed to call this gateway.")]
    CallerNotMapped,
    #[error("The key has expired; ask for a new one.")]
    ConsumerKeyExpired,
    #[error("This consumer may not call this deployment.")]
    DeploymentNotAllowed,
    #[error("Resource not found")]
    RouteNotFound,
    #[error(
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."
    )]
    DeploymentNotFound,
    #[error("The request body is larger than the limit of {limit} bytes.")]
    RequestBodyTooLarge { limit: usize },
    #[error("The request headers are larger than the limit of {limit} bytes.")]
    RequestHeadersTooLarge { limit: usize },
    #[error("The request body could not be read: {0}")]
    RequestBodyUnreadable(String),
    /// Never seen by the client, which is gone: recorded so the request's end says why.
    #[error("The client closed the connection before its request body was complete.")]
    ClientDisconnected,
    #[error("The request body was not received within {timeout_ms} ms.")]
    RequestBodyTimeout { timeout_ms: u64 },
    #[error(
        "The request path is not canonical: each segment must be letters, digits, '-', '.', '_', '~' or ':', never '.' or '..', with no percent-escapes or backslashes."
    )]
    PathNotCanonical,
    #[error("The request body must name a model in `model`.")]
    ModelMissing,
    #[error("Tollgate is handling as many requests as it is configured to; retry later.")]
    ServerBusy,
    #[error("Tollgate is shutting down; retry later.")]
    ShuttingDown,
    #[error("Tollgate failed to handle the request.")]
    Internal,
    #[error("The backend could not be reached.")]
    BackendUnreachable { detail: String },
    /// The backend's Entra ID token could not be had (the identity endpoint down, the
    /// identity not assigned); the detail is for the record, not the client.
    #[error("Tollgate could not authenticate to the backend.")]
    BackendCredential { detail: String },
    #[error("The backend did not answer within {timeout_ms} ms.")]
    BackendTimeout { timeout_ms: u64 },
    #[error(
        "Every backend of this deployment is throttled; retry after {} ms.",
        retry_after.as_millis()
    )]
    AllBackendsResting { retry_after: std::time::Duration },
    #[error(
        "Every backend of this deployment is failing; retry after {} ms.",
        retry_after.as_millis()
    )]
    AllBackendsTripped { retry_after: std::time::Duration },
    #[error(
        "The consumer's limit of {limit} is reached; retry after {} seconds.",
        retry_after.as_secs().max(1)
    )]
    ConsumerRateLimited {
        limit: String,
        retry_after: std::time::Duration,
    },
    #[error(
        "Out of quota: the consumer's quota of {limit} is used up; it is replenished in {} seconds.",
        retry_after.as_secs().max(1)
    )]
    ConsumerQuotaExceeded {
        limit: String,
        retry_after: std::time::Duration,
    },
    #[error("Tollgate cannot check the consumer's limits right now; retry later.")]
    LimitsUnavailable,
    #[error("Tollgate cannot record more requests right now; retry later.")]
    RecorderFull,
    #[error("The request could not be recorded.")]
    RecorderFailed { detail: String },
}

impl ProxyError {
    /// (HTTP status, AOAI error code, source): the one table.
    fn table(&self) -> (StatusCode, &'static str, ErrorSource) {
        use ErrorSource::*;
        match self {
            ProxyError::ConsumerKeyInvalid => (StatusCode::UNAUTHORIZED, "401", Downstream),
            ProxyError::RouteNotFound => (StatusCode::NOT_FOUND, "404", Downstream),
            ProxyError::ConsumerKeyExpired => (StatusCode::UNAUTHORIZED, "401", Downstream),
            // As AOAI answers a caller without the role for a data action.
            ProxyError::DeploymentNotAllowed => {
                (StatusCode::FORBIDDEN, "PermissionDenied", Downstream)
            }
            // As AOAI answers a bad token.
            ProxyError::CallerTokenInvalid { .. } => (StatusCode::UNAUTHORIZED, "401", Downstream),
            ProxyError::CallerNotMapped => (StatusCode::FORBIDDEN, "PermissionDenied", Downstream),
            ProxyError::DeploymentNotFound => {
                (StatusCode::NOT_FOUND, "DeploymentNotFound", Downstream)
            }
            ProxyError::RequestBodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                Downstream,
            ),
            ProxyError::RequestHeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "RequestHeadersTooLarge",
                Downstream,
            ),
            ProxyError::RequestBodyUnreadable(_) => {
                (StatusCode::BAD_REQUEST, "BadRequest", Downstream)
            }
            // 499 is the de-facto "client closed request" status (nginx); no client sees it.
            ProxyError::ClientDisconnected => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "ClientClosedRequest",
                Downstream,
            ),
            ProxyError::RequestBodyTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, "RequestTimeout", Downstream)
            }
            ProxyError::PathNotCanonical => (StatusCode::BAD_REQUEST, "InvalidPath", Downstream),
            ProxyError::ModelMissing => (StatusCode::BAD_REQUEST, "MissingModel", Downstream),
            ProxyError::ServerBusy => (StatusCode::SERVICE_UNAVAILABLE, "ServerBusy", Internal),
            ProxyError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "ShuttingDown", Internal),
            ProxyError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError", Internal),
            ProxyError::BackendUnreachable { .. } => {
                (StatusCode::BAD_GATEWAY, "BackendUnreachable", Upstream)
            }
            ProxyError::BackendCredential { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "BackendCredentialUnavailable",
                Internal,
            ),
            ProxyError::BackendTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "BackendTimeout", Upstream)
            }
            // AOAI's own code for a throttled request, so clients back off as they would.
            ProxyError::AllBackendsResting { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "429", Upstream)
            }
            ProxyError::AllBackendsTripped { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "BackendsUnavailable",
                Upstream,
            ),
            // AOAI's own code for a throttled request, so clients back off as they would.
            ProxyError::ConsumerRateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "429", Downstream)
            }
            // As APIM's quota-by-key answers a spent quota.
            ProxyError::ConsumerQuotaExceeded { .. } => {
                (StatusCode::FORBIDDEN, "QuotaExceeded", Downstream)
            }
            ProxyError::LimitsUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "LimitsUnavailable",
                Internal,
            ),
            ProxyError::RecorderFull => (StatusCode::SERVICE_UNAVAILABLE, "RecorderFull", Internal),
            ProxyError::RecorderFailed { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "RecorderFailed", Internal)
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        self.table().0
    }

    /// What goes in the `end` record: the safe message plus internal detail.
    pub fn info(&self) -> ErrorInfo {
        let (_, code, source) = self.table();
        let message = match self {
            ProxyError::CallerTokenInvalid { reason } => format!("{self} ({reason})"),
            ProxyError::BackendUnreachable { detail }
            | ProxyError::BackendCredential { detail }
            | ProxyError::RecorderFailed { detail } => {
                format!("{self} {detail}")
            }
            _ => self.to_string(),
        };
        ErrorInfo {
            source,
            code: code.to_owned(),
            message,
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, code, _) = self.table();
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        let rest = match &self {
            ProxyError::AllBackendsResting { retry_after }
            | ProxyError::AllBackendsTripped { retry_after }
            | ProxyError::ConsumerRateLimited { retry_after, .. }
            | ProxyError::ConsumerQuotaExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(rest) = rest {
            // As AOAI sends them: whole seconds (rounded up) and milliseconds.
            let h = response.headers_mut();
            let ms = rest.as_millis().max(1);
            h.insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(ms.div_ceil(1000) as u64),
            );
            h.insert(
                axum::http::HeaderName::from_static("retry-after-ms"),
                axum::http::HeaderValue::from(ms as u64),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE && rest.is_none() {
            // Clients (the openai SDK among them) honour it before retrying.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
