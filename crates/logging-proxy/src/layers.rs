//! The proxy path's tower layers (axum middleware), outermost first:
//!
//! 1. [`context`] — gives the request its id and start time and puts `x-tollgate-request-id`
//!    on every answer, Tollgate's own refusals included.
//! 2. [`http_limits`] — before anything is recorded or authenticated: the path must be
//!    canonical (400), the headers within `max_header_bytes` (431), and a slot of
//!    `max_concurrent_requests` free (else shed with 503 and `retry-after`). Inserts the parsed
//!    [`Route`] and the slot.
//! 3. [`authenticate`] — the consumer from its key, or from an Entra ID caller's token
//!    (`entra_callers.rs`) (401 otherwise; 403 for a valid token no rule maps). Inserts the
//!    [`Consumer`].
//!
//! Refusals go through [`crate::reject::refuse`], which keeps a bounded summary.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tollgate_records::Consumer;

use crate::AppState;
use crate::auth;
use crate::context::{REQUEST_ID_HEADER, RequestInfo, Slot, SlotCell};
use crate::entra_callers::Rejected;
use crate::error::ProxyError;
use crate::headers;
use crate::path::{self, PathError, Route};
use crate::reject::refuse;

pub(crate) async fn context(request: Request, next: Next) -> Response {
    let info = RequestInfo::new();
    let id = info.header_value();
    let mut request = request;
    request.extensions_mut().insert(info);
    let mut response = next.run(request).await;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// The context layer runs first; without it the router is mis-assembled.
fn info_of(request: &Request) -> Option<RequestInfo> {
    request.extensions().get::<RequestInfo>().cloned()
}

pub(crate) async fn http_limits(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(info) = info_of(&request) else {
        return ProxyError::Internal.into_response();
    };
    let (mut parts, body) = request.into_parts();
    let route = match path::parse(parts.uri.path()) {
        Ok(route) => route,
        // Not an AOAI path at all: nothing to record.
        Err(PathError::NotFound) => return ProxyError::RouteNotFound.into_response(),
        Err(PathError::NotCanonical) => {
            return refuse(&app, &info, &parts, None, ProxyError::PathNotCanonical);
        }
    };
    let limit = app.config.limits.max_header_bytes;
    if headers::total_bytes(&parts.headers) > limit {
        let error = ProxyError::RequestHeadersTooLarge { limit };
        return refuse(&app, &info, &parts, Some(&route), error);
    }
    let Ok(permit) = app.slots.clone().try_acquire_owned() else {
        // Shed, not recorded: under overload, writing a record per refusal would add to it.
        app.stats.shed.fetch_add(1, Ordering::Relaxed);
        return ProxyError::ServerBusy.into_response();
    };
    let slot: SlotCell = Arc::new(std::sync::Mutex::new(Some(Slot(permit))));
    parts.extensions.insert(route);
    parts.extensions.insert(slot);
    next.run(Request::from_parts(parts, body)).await
}

pub(crate) async fn authenticate(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // A bearer JWT is an Entra ID caller's token when callers are configured; anything else
    // presented is a consumer key.
    let jwt = auth::presented_key(request.headers())
        .filter(|k| app.callers.enabled() && k.split('.').count() == 3)
        .map(str::to_owned);
    let consumer: Result<Consumer, ProxyError> =
        match jwt {
            Some(token) => app
                .callers
                .authenticate(&token)
                .await
                .map_err(|rejected| match rejected {
                    Rejected::Invalid(reason) => ProxyError::CallerTokenInvalid { reason },
                    Rejected::Unmapped => ProxyError::CallerNotMapped,
                })
                // A rule may name a consumer created in the registry; one deleted since (or never
                // created) maps nobody.
                .and_then(|c| {
                    if app.directory.load().ids.contains(&c.id) {
                        Ok(c)
                    } else {
                        Err(ProxyError::CallerNotMapped)
                    }
                }),
            None => auth::authenticate(&app.directory.load().keys, request.headers()).map_err(
                |refused| match refused {
                    auth::KeyRefused::Unknown => ProxyError::ConsumerKeyInvalid,
                    auth::KeyRefused::Expired => ProxyError::ConsumerKeyExpired,
                },
            ),
        };
    match consumer {
        Ok(consumer) => {
            let mut request = request;
            request.extensions_mut().insert(consumer);
            next.run(request).await
        }
        Err(error) => {
            let Some(info) = info_of(&request) else {
                return ProxyError::Internal.into_response();
            };
            let (parts, _body) = request.into_parts();
            let route = parts.extensions.get::<Route>();
            refuse(&app, &info, &parts, route, error)
        }
    }
}
