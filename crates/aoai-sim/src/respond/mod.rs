//! Request handling: routing, auth, validation, limits, faults, and the response bodies and SSE
//! frames of each operation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::Value;

use crate::Simulator;
use crate::config::SimDeployment;
use crate::error::AoaiError;
use crate::fault::Fault;
use crate::generate;

mod auth;
mod chat;
mod completions;
mod embeddings;
mod frames;
mod params;
mod routing;
pub(crate) mod windows;

use routing::Operation;

pub(crate) async fn handle(sim: &Simulator, request: Request<Body>) -> Result<Response, AoaiError> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query();
    let route = routing::route(&path).ok_or_else(AoaiError::resource_not_found)?;
    let op = route.op;
    if parts.method != Method::POST {
        return Err(AoaiError::resource_not_found());
    }
    if !auth::authorized(sim.inner.config.api_key.as_deref(), &parts.headers) {
        return Err(AoaiError::unauthorized());
    }
    let api_version = routing::api_version(query, route.v1)?;
    let limit = sim.inner.config.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| AoaiError::payload_too_large(limit))?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|_| {
        AoaiError::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.",
            None,
        )
    })?;
    if !body.is_object() {
        return Err(AoaiError::invalid_request(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let deployment_name = routing::deployment_name(&route, &body)?;
    let deployment = sim
        .inner
        .deployments
        .get(&deployment_name)
        .ok_or_else(AoaiError::deployment_not_found)?;
    if let Some(c) = sim.inner.requests.get(&deployment_name) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    if deployment.kind != op.served_by() {
        return Err(AoaiError::operation_not_supported(
            op.short(),
            &deployment.model,
        ));
    }

    let fault = match parts
        .headers
        .get("x-sim-fault")
        .and_then(|v| v.to_str().ok())
    {
        Some(spec) => Fault::parse(spec)
            .map_err(|e| AoaiError::invalid_request(format!("x-sim-fault: {e}"), None))?,
        None => sim.inner.default_fault.clone().unwrap_or_default(),
    };
    if let Some(delay) = fault.slow_first_byte {
        tokio::time::sleep(delay).await;
    }
    if fault.content_filter {
        return Err(AoaiError::prompt_filtered());
    }
    if let Some(status) = fault.status {
        return Err(AoaiError::for_status(
            status,
            op.name(),
            &api_version,
            fault.retry_after_ms.unwrap_or(1000),
        ));
    }

    let latency = Latency::from(sim, &parts.headers);
    // The seed ignores how the answer is delivered, so the same request streamed or not
    // yields the same content and the same usage.
    let mut seed_body = body.clone();
    if let Some(map) = seed_body.as_object_mut() {
        map.remove("stream");
        map.remove("stream_options");
    }
    let seed =
        generate::stable_hash(&[deployment.name.as_bytes(), seed_body.to_string().as_bytes()]);
    let config = &sim.inner.config;
    let answer = match op {
        Operation::Chat => chat::answer(config, deployment, &body, seed)?,
        Operation::Completions => completions::answer(config, deployment, &body, seed)?,
        Operation::Embeddings => embeddings::answer(deployment, &body, seed)?,
    };
    let remaining = sim
        .inner
        .windows
        .admit(deployment, &body, answer.prompt_tokens)
        .map_err(|t| AoaiError::rate_limited(op.name(), &api_version, t.retry_after_ms))?;

    if latency.ttft > Duration::ZERO {
        tokio::time::sleep(latency.ttft).await;
    }
    let mut response = match answer.reply {
        Reply::Json(value) => {
            if latency.inter_token > Duration::ZERO && answer.completion_tokens > 0 {
                tokio::time::sleep(latency.inter_token * answer.completion_tokens as u32).await;
            }
            let bytes = Bytes::from(value.to_string());
            let mut resp = match fault.reset_after_chunks {
                Some(n) => Response::new(cut_body(bytes, n)),
                None => Response::new(Body::from(bytes)),
            };
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Reply::Stream(plan) => {
            let mut resp = Response::new(stream_body(
                plan.into_frames(answer.prompt_tokens, answer.completion_tokens),
                latency.inter_token,
                fault.reset_after_chunks,
            ));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
    };
    *response.status_mut() = StatusCode::OK;
    add_headers(
        response.headers_mut(),
        &parts.headers,
        deployment,
        remaining,
        op,
        seed,
    );
    Ok(response)
}

struct Latency {
    ttft: Duration,
    inter_token: Duration,
}

impl Latency {
    /// Configured latency, overridable per request with `x-sim-ttft-ms` and
    /// `x-sim-inter-token-ms`.
    fn from(sim: &Simulator, headers: &HeaderMap) -> Self {
        let ms = |name: &str, default: u64| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_millis(default), Duration::from_millis)
        };
        Latency {
            ttft: ms("x-sim-ttft-ms", sim.inner.config.time_to_first_token_ms),
            inter_token: ms("x-sim-inter-token-ms", sim.inner.config.inter_token_ms),
        }
    }
}

/// What an operation answers, before delivery.
pub(crate) struct Answer {
    reply: Reply,
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub(crate) enum Reply {
    Json(Value),
    Stream(frames::StreamPlan),
}

fn add_headers(
    h: &mut HeaderMap,
    request: &HeaderMap,
    deployment: &SimDeployment,
    remaining: Option<windows::Remaining>,
    op: Operation,
    seed: u64,
) {
    let id = uuid::Uuid::now_v7().to_string();
    let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    };
    set(h, "apim-request-id", &id);
    set(h, "x-request-id", &id);
    set(h, "x-ms-region", "Sim Central");
    set(h, "x-ms-rai-invoked", "true");
    set(h, "x-content-type-options", "nosniff");
    set(
        h,
        "azureml-model-session",
        &format!("sim-{}-{:04x}", op.short(), seed & 0xffff),
    );
    set(h, "x-ms-deployment-name", &deployment.name);
    if let Some(client_id) = request
        .get("x-ms-client-request-id")
        .and_then(|v| v.to_str().ok())
    {
        set(h, "x-ms-client-request-id", client_id);
    }
    if let Some(remaining) = remaining {
        remaining.write_headers(h);
    }
}

fn reset_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected fault: connection reset",
    )
}

/// Sends the frames, pacing content frames by `inter_token`, and aborts the connection after
/// `reset_after` frames when asked.
fn stream_body(
    frames: Vec<frames::Frame>,
    inter_token: Duration,
    reset_after: Option<usize>,
) -> Body {
    if inter_token.is_zero() && reset_after.is_none() {
        return Body::from_stream(futures_util::stream::iter(
            frames.into_iter().map(|f| Ok::<_, std::io::Error>(f.bytes)),
        ));
    }
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), 0usize, false),
        move |(mut frames, sent, done)| async move {
            if done {
                return None;
            }
            if reset_after == Some(sent) {
                // Return Pending once so hyper flushes the frames already sent before the
                // reset, as a real mid-stream cut delivers them.
                tokio::task::yield_now().await;
                return Some((Err(reset_error()), (frames, sent, true)));
            }
            let frame = frames.next()?;
            if frame.paced && !inter_token.is_zero() {
                tokio::time::sleep(inter_token).await;
            }
            Some((Ok(frame.bytes), (frames, sent + 1, false)))
        },
    );
    Body::from_stream(stream.boxed())
}

/// A non-stream body cut after `chunks` pieces of 64 bytes, then reset.
fn cut_body(bytes: Bytes, chunks: usize) -> Body {
    let pieces: Vec<Bytes> = bytes
        .chunks(64)
        .take(chunks)
        .map(Bytes::copy_from_slice)
        .collect();
    let stream = futures_util::stream::iter(pieces.into_iter().map(Ok)).chain(
        futures_util::stream::once(async {
            tokio::task::yield_now().await;
            Err(reset_error())
        }),
    );
    Body::from_stream(stream)
}
