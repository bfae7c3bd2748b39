//! The request handler, in order: route → auth → api-version → body → deployment → fault →
//! operation → rate window → deliver, then AOAI's response headers. The rate window comes after
//! the operation because its token estimate needs the prompt's count.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::Response;
use serde_json::Value;

use crate::Simulator;
use crate::config::SimDeployment;
use crate::error::AoaiError;
use crate::fault::Fault;
use crate::generate;

mod auth;
mod cache;
mod chat;
mod completions;
mod delivery;
mod embeddings;
mod files;
mod frames;
mod params;
mod responses;
mod routing;
pub(crate) mod windows;

pub(crate) use cache::PromptCache;
pub(crate) use files::Files;

use routing::Operation;

/// What an operation answers, before delivery.
pub(crate) struct Answer {
    reply: Reply,
    figures: frames::Figures,
}

pub(crate) enum Reply {
    Json(Value),
    Stream(frames::StreamPlan),
    /// Frames already built (the Responses API's typed events).
    Events(Vec<frames::Frame>),
}

pub(crate) async fn handle(sim: &Simulator, request: Request<Body>) -> Result<Response, AoaiError> {
    // The path is read from a copy: the handler takes the request whole.
    let path = request.uri().path().to_owned();
    if let Some((v1, tail)) = files::is_files_path(&path) {
        auth::check(
            sim.inner.config.api_key.as_deref(),
            sim.inner.config.local_auth_disabled,
            request.headers(),
        )?;
        return files::handle(
            &sim.inner.files,
            sim.inner.config.max_body_bytes,
            v1,
            &tail,
            request,
        )
        .await;
    }
    let (parts, body) = request.into_parts();
    let query = parts.uri.query();
    let route = routing::route(&path).ok_or_else(AoaiError::resource_not_found)?;
    let op = route.op;
    if parts.method != Method::POST {
        return Err(AoaiError::resource_not_found());
    }
    auth::check(
        sim.inner.config.api_key.as_deref(),
        sim.inner.config.local_auth_disabled,
        &parts.headers,
    )?;
    let api_version = routing::api_version(query, route.v1)?;
    let body = read_json_object(body, sim.inner.config.max_body_bytes).await?;
    if body.get("stream_options").is_some() && !routing::knows_stream_options(&api_version) {
        return Err(AoaiError::unknown_parameter("stream_options"));
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

    let fault = fault_for(sim, &parts.headers)?;
    delivery::slow_first_byte(&fault).await;
    if fault.content_filter {
        return Err(AoaiError::prompt_filtered());
    }
    if fault.no_stream_options && body.get("stream_options").is_some() {
        return Err(AoaiError::unknown_parameter("stream_options"));
    }
    if let Some(status) = fault.status {
        return Err(AoaiError::for_status(
            status,
            op.name(),
            &api_version,
            fault.retry_after_ms.unwrap_or(1000),
        ));
    }

    let config = &sim.inner.config;
    let latency = delivery::Latency::from_request(config, &parts.headers);
    let seed = seed_for(deployment, &body);
    let answer = match op {
        Operation::Chat => chat::answer(
            config,
            deployment,
            &body,
            seed,
            &sim.inner.prompt_cache,
            fault.completion_filter,
        )?,
        Operation::Completions => completions::answer(config, deployment, &body, seed)?,
        Operation::Embeddings => embeddings::answer(deployment, &body, seed)?,
        Operation::Responses => responses::answer(config, deployment, &body, seed)?,
    };
    let remaining = sim
        .inner
        .windows
        .admit(deployment, &body, answer.figures.prompt)
        .map_err(|t| AoaiError::rate_limited(op.name(), &api_version, t.retry_after_ms))?;

    let mut response = delivery::deliver(answer, &latency, &fault).await;
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

async fn read_json_object(body: Body, limit: usize) -> Result<Value, AoaiError> {
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
    Ok(body)
}

/// The request's `x-sim-fault`, else the configured default fault, else none.
fn fault_for(sim: &Simulator, headers: &HeaderMap) -> Result<Fault, AoaiError> {
    match headers.get("x-sim-fault").and_then(|v| v.to_str().ok()) {
        Some(spec) => Fault::parse(spec)
            .map_err(|e| AoaiError::invalid_request(format!("x-sim-fault: {e}"), None)),
        None => Ok(sim.inner.default_fault.clone().unwrap_or_default()),
    }
}

/// The seed of everything generated for this request. It ignores how the answer is delivered,
/// so the same request streamed or not yields the same content and the same usage.
fn seed_for(deployment: &SimDeployment, body: &Value) -> u64 {
    let mut seed_body = body.clone();
    if let Some(map) = seed_body.as_object_mut() {
        map.remove("stream");
        map.remove("stream_options");
    }
    generate::stable_hash(&[deployment.name.as_bytes(), seed_body.to_string().as_bytes()])
}

/// AOAI's response headers: request ids, region, model session, deployment, the client's
/// request id echoed, and what is left of the rate window.
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
