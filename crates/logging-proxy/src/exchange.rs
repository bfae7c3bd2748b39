//! The forward phase: the exchange with the backend runs in a task on the proxy's tracker, not
//! in the client's handler. AOAI sends a non-stream answer's headers only once the whole answer
//! is generated, so a client that gives up before then is the common case; the exchange goes
//! on without it, the answer is read (within the drain bounds) and the request is recorded
//! and billed with AOAI's usage, exactly as if the client had stayed.
//!
//! The task owns the accepted request from here: it writes the `request` record, sends the
//! request, and then either hands the response (wrapped in the tee) to the handler or, when the
//! handler is gone, drops it, which makes the tee drain the rest and write the `end`. Backend
//! failures and shutdown end the request through `reject.rs`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tollgate_records::Attempt;

use crate::AppState;
use crate::context::Ctx;
use crate::error::ProxyError;
use crate::headers;
use crate::path;
use crate::phases::Described;
use crate::pool::{self, Plan};
use crate::reject::{Accepted, end_accepted};
use crate::stream_usage::{self, Outgoing, WithoutUsageFrame};
use crate::tee::{self, Exchange, millis};

/// Starts the exchange and waits for its response head (or Tollgate's error answer).
pub(crate) async fn start(
    app: Arc<AppState>,
    ctx: Ctx,
    described: Described,
    outgoing: Outgoing,
    plan: Plan,
    accepted: Accepted,
) -> Response {
    let (tx, rx) = oneshot::channel();
    let tracker = app.requests.clone();
    tracker.spawn(run(app, ctx, described, outgoing, plan, accepted, tx));
    match rx.await {
        Ok(response) => response,
        // The task always answers unless it panicked; its request is then recorded as
        // incomplete by the parser's deadline.
        Err(_) => ProxyError::Internal.into_response(),
    }
}

async fn run(
    app: Arc<AppState>,
    mut ctx: Ctx,
    described: Described,
    outgoing: Outgoing,
    plan: Plan,
    accepted: Accepted,
    mut answer: oneshot::Sender<Response>,
) {
    let next_seq = described.next_seq();
    for record in described.records() {
        app.recorder.record(record);
    }
    let mut accepted = accepted;
    accepted.recorded(&app.recorder, &ctx.info, next_seq);
    // The limits phase's reservation: settled by the tee with AOAI's usage, or given back
    // whole when no backend answered the request.
    let quota = std::sync::Mutex::new(ctx.quota.take());
    let end = |error: ProxyError, attempts: Vec<Attempt>, accepted: Accepted| {
        if let Some(q) = quota
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            q.release();
        }
        end_accepted(
            &app,
            &ctx.info,
            Vec::new(),
            next_seq,
            error,
            attempts,
            accepted,
        )
    };
    let mut sending = Sending {
        body: outgoing.body,
        client_body: outgoing.client_body,
        // Set by each attempt, from what it sent.
        usage_injected: false,
        withheld: false,
        attempts: Vec::new(),
    };
    let max_attempts = app.config.limits.max_attempts as usize;
    let retry_deadline = Duration::from_millis(app.config.limits.retry_deadline_ms);
    let Plan { live, order } = plan;
    let mut order = order.into_iter().peekable();
    // The pool's backends in the plan's order: on to the next one after a 429, a 5xx, a
    // connect error or a first-byte timeout (nothing has gone to the client yet; the body is
    // replayed from the bytes read); the last one's answer, whatever it is, is the client's.
    // A backend that filled up since the plan was made is passed over.
    let (upstream, b, slot, attempt_started) = loop {
        let Some((b, s)) = order.next().and_then(|i| live.backend(i)) else {
            // Every backend left filled up since the plan was made (an attempt is never
            // dropped for one: see `last`): throttled here, as a full backend is.
            let error = ProxyError::AllBackendsResting {
                retry_after: pool::DEFAULT_REST,
            };
            let r = end(error, sending.attempts, accepted);
            let _ = answer.send(r);
            return;
        };
        let Some(slot) = s.enter(b.max_concurrent_requests) else {
            continue;
        };
        let attempt = sending.attempt(&app, &ctx, b).await;
        // Decided once the attempt is over: the last when no backend left has room (its answer
        // is then the client's, not dropped for a backend that cannot take the request), when
        // the attempts are used up, or past the retry deadline counted from the arrival.
        let room_left = order.clone().any(|i| {
            live.backend(i)
                .is_some_and(|(b, s)| !s.full(b.max_concurrent_requests))
        });
        let last = !room_left
            || sending.attempts.len() + 1 >= max_attempts
            || ctx.info.started.elapsed() >= retry_deadline;
        match attempt {
            Ok((upstream, started)) => {
                s.answered_in(started.elapsed());
                let status = upstream.status().as_u16();
                let retry_after = retry_after_ms(upstream.headers());
                match status {
                    429 => app.pools.rest(
                        s,
                        retry_after.map_or(pool::DEFAULT_REST, Duration::from_millis),
                    ),
                    500..=599 => app.pools.failed(s, &b.name),
                    _ => app.pools.succeeded(s),
                }
                if last || !(status == 429 || matches!(status, 500 | 502 | 503 | 504)) {
                    break (upstream, b, slot, started);
                }
                sending.attempts.push(Attempt {
                    backend: b.name.clone(),
                    status: Some(status),
                    duration_ms: millis(started.elapsed()),
                    retry_after_ms: retry_after,
                    error: None,
                });
            }
            Err((error, detail, started)) => {
                // Shutting down, or no token for the backend: not the backend's failure.
                if !matches!(
                    error,
                    ProxyError::ShuttingDown | ProxyError::BackendCredential { .. }
                ) {
                    app.pools.failed(s, &b.name);
                }
                sending
                    .attempts
                    .push(failed_attempt(&b.name, started, &detail));
                if last || matches!(error, ProxyError::ShuttingDown) {
                    let r = end(error, sending.attempts, accepted);
                    let _ = answer.send(r);
                    return;
                }
            }
        }
    };
    let Sending {
        usage_injected,
        withheld,
        mut attempts,
        ..
    } = sending;
    let status = upstream.status();
    let response_headers = upstream.headers().clone();
    attempts.push(Attempt {
        backend: b.name.clone(),
        status: Some(status.as_u16()),
        duration_ms: millis(attempt_started.elapsed()),
        retry_after_ms: retry_after_ms(&response_headers),
        // The parser's reason for an estimated stream: this backend was not asked.
        error: withheld.then(|| tollgate_records::STREAM_OPTIONS_NOT_SENT.to_owned()),
    });
    let exchange = Exchange {
        request_id: ctx.info.request_id.to_string(),
        started: ctx.info.started,
        status: status.as_u16(),
        backend: b.name.clone(),
        attempts,
        ttfb_ms: millis(ctx.info.started.elapsed()),
        headers: tee::selected_headers(&response_headers),
        content_type: content_type(&response_headers).map(str::to_owned),
        first_segment_seq: next_seq,
        accepted,
        price_multiplier: b.price_multiplier,
        backend_slot: slot,
        quota: quota
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    };
    let remaining = exchange.quota.as_ref().map(|q| q.remaining);
    let mut body = tee::TeeBody::new(
        upstream,
        exchange,
        app.recorder.clone(),
        app.requests.clone(),
        app.abort.clone(),
        app.config.limits.clone(),
        &app.config.recorder,
    );
    // A sized answer's first chunk is read (and, for a non-stream answer, recorded and
    // journaled) before the head goes out, so head and body leave in one write. Not for a
    // client already gone: the body is then drained and recorded as disconnected.
    if !answer.is_closed() {
        tokio::select! {
            () = body.prime() => {}
            () = answer.closed() => {}
        }
    }
    // The usage frame the proxy asked for is recorded with the rest and kept from the client,
    // which did not ask for it (many clients index `choices[0]` of every chunk).
    let filter = usage_injected
        && status.is_success()
        && tollgate_records::is_event_stream(content_type(&response_headers));
    let mut response = if filter {
        Response::new(Body::from_stream(WithoutUsageFrame::new(body)))
    } else {
        Response::new(Body::from_stream(body))
    };
    *response.status_mut() =
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    // `x-tollgate-request-id` is added by the context layer on the way out.
    headers::downstream(&response_headers, response.headers_mut());
    if let Some(remaining) = remaining {
        headers::tighten_remaining(response.headers_mut(), remaining);
    }
    if filter {
        // Fewer bytes than AOAI sent: a length would be wrong (streams are chunked anyway).
        response
            .headers_mut()
            .remove(axum::http::header::CONTENT_LENGTH);
    }
    // When the client is gone the response comes back here and is dropped: the tee then
    // drains the rest of AOAI's answer in a tracked task and records it.
    let _ = answer.send(response);
}

/// A request on its way to a pool's backends: the body to send (and the client's own, while
/// the usage phase's addition is untried), and the attempts so far.
struct Sending {
    body: Bytes,
    client_body: Option<Bytes>,
    /// The body sent last carried the usage phase's addition.
    usage_injected: bool,
    /// The body sent last was the client's own because its backend has `include_usage`
    /// off, though the usage phase had asked.
    withheld: bool,
    attempts: Vec<Attempt>,
}

impl Sending {
    /// One backend: sends the request; a 400 naming the `stream_options` the usage phase added
    /// sends the client's own body again (asking never costs the client its answer). The
    /// answer and when its attempt started, or the error to answer with and its detail.
    async fn attempt(
        &mut self,
        app: &AppState,
        ctx: &Ctx,
        b: &crate::config::Backend,
    ) -> Result<(reqwest::Response, Instant), (ProxyError, String, Instant)> {
        let url = path::upstream_url(
            &b.endpoint,
            &ctx.route,
            ctx.query.as_deref(),
            &b.deployment_names,
        );
        let mut upstream_headers = headers::upstream(&ctx.headers);
        let started = Instant::now();
        match b.auth.header().await {
            Ok(Some((name, value))) => {
                upstream_headers.insert(name, value);
            }
            Ok(None) => {}
            Err(detail) => {
                return Err((
                    ProxyError::BackendCredential {
                        detail: detail.clone(),
                    },
                    detail,
                    started,
                ));
            }
        }
        let first_byte = Duration::from_millis(app.config.limits.first_byte_timeout_ms);
        loop {
            let started = Instant::now();
            // A backend that does not take `stream_options` gets the client's own body; the
            // usage phase's addition is tried only where it may be.
            let (body, injected) = match (&self.client_body, b.include_usage) {
                (Some(original), false) => (original.clone(), false),
                _ => (self.body.clone(), self.client_body.is_some()),
            };
            self.usage_injected = injected;
            self.withheld = self.client_body.is_some() && !b.include_usage;
            let request = app
                .client
                .request(ctx.method.clone(), url.clone())
                .headers(upstream_headers.clone())
                .body(reqwest::Body::from(body));
            let upstream = send(app, request, first_byte)
                .await
                .map_err(|(error, detail)| (error, detail, started))?;
            let Some(original) = self
                .client_body
                .take_if(|_| injected && upstream.status() == StatusCode::BAD_REQUEST)
            else {
                return Ok((upstream, started));
            };
            match read_rejection(upstream, app.config.limits.idle_timeout_ms).await {
                Rejection::StreamOptions => {
                    self.attempts.push(Attempt {
                        backend: b.name.clone(),
                        status: Some(400),
                        duration_ms: millis(started.elapsed()),
                        retry_after_ms: None,
                        error: Some(tollgate_records::STREAM_OPTIONS_REJECTED.to_owned()),
                    });
                    self.body = original;
                }
                Rejection::Other(resp) => return Ok((resp, started)),
            }
        }
    }
}

/// What a 400 answer to an injected request turned out to be.
enum Rejection {
    /// The backend named `stream_options`: send the client's own body.
    StreamOptions,
    /// Any other 400, rebuilt from what was read so the tee records and forwards it as usual.
    Other(reqwest::Response),
}

/// Reads a 400 answer (small, and bounded) to see whether it is about `stream_options`. An
/// answer too large, too slow or unreadable is passed on as it is.
async fn read_rejection(upstream: reqwest::Response, idle_timeout_ms: u64) -> Rejection {
    let small = upstream
        .content_length()
        .is_some_and(|n| n <= stream_usage::MAX_REJECTION_BYTES);
    if !small {
        return Rejection::Other(upstream);
    }
    let status = upstream.status();
    let version = upstream.version();
    let headers = upstream.headers().clone();
    let read = tokio::time::timeout(Duration::from_millis(idle_timeout_ms), upstream.bytes()).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        // What could be read is gone with the failed read: answer as a broken backend would.
        Ok(Err(_)) | Err(_) => Bytes::new(),
    };
    if stream_usage::rejects_stream_options(&bytes) {
        return Rejection::StreamOptions;
    }
    let mut headers = headers;
    // The length of what is passed on (all of it, or nothing after a failed read).
    headers.insert(
        axum::http::header::CONTENT_LENGTH,
        HeaderValue::from(bytes.len()),
    );
    let mut rebuilt = http::Response::new(bytes);
    *rebuilt.status_mut() = status;
    *rebuilt.version_mut() = version;
    *rebuilt.headers_mut() = headers;
    Rejection::Other(reqwest::Response::from(rebuilt))
}

/// Sends one attempt, bounded by the first-byte timeout and stopped by shutdown; a failure is
/// the error to answer with and the attempt's detail.
async fn send(
    app: &AppState,
    request: reqwest::RequestBuilder,
    first_byte: Duration,
) -> Result<reqwest::Response, (ProxyError, String)> {
    tokio::select! {
        r = tokio::time::timeout(first_byte, request.send()) => match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let detail = e.to_string();
                Err((ProxyError::BackendUnreachable { detail: detail.clone() }, detail))
            }
            Err(_) => Err((
                ProxyError::BackendTimeout {
                    timeout_ms: app.config.limits.first_byte_timeout_ms,
                },
                "first byte timeout".to_owned(),
            )),
        },
        () = app.abort.cancelled() => Err((
            ProxyError::ShuttingDown,
            "shutdown before the response".to_owned(),
        )),
    }
}

fn content_type(headers: &reqwest::header::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

fn failed_attempt(backend: &str, started: Instant, detail: &str) -> Attempt {
    Attempt {
        backend: backend.to_owned(),
        status: None,
        duration_ms: millis(started.elapsed()),
        retry_after_ms: None,
        error: Some(detail.to_owned()),
    }
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
    fn retry_after_prefers_ms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after_ms(&h), Some(2000));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after_ms(&h), Some(150));
    }
}
