//! The request path's phases, run in order over one per-request context ([`Ctx`]) once the
//! layers (`layers.rs`: context, HTTP limits, authentication) let a request through:
//!
//! 1. **admit** — the recorder can take the request's records (else 503, nothing accepted
//!    unrecorded); from here the request is *accepted* and ends with exactly one `end` record;
//! 2. **read body** — bounded by `max_request_body_bytes` (413) and `body_read_timeout_ms` (408);
//! 3. **describe** — the `request` record: headers redacted, JSON body kept as JSON within
//!    `max_json_depth`, stream flag and (on `/openai/v1/`) the model peeked from the body; a
//!    body over `max_body_part_bytes` goes into `part` records;
//! 4. **route** — deployment → backend (404 `DeploymentNotFound`; 400 on v1 without a model);
//! 5. **limits** — `quota.rs`: the consumer's requests and tokens per minute and token quotas
//!    (429 or 403, recorded, naming the limit); tokens are reserved from an estimate and
//!    settled at the end with AOAI's usage;
//! 6. **usage** — `stream_usage.rs`: a chat or completions stream that does not ask for its
//!    usage is sent asking for it, so its bill is AOAI's figure rather than an estimate;
//! 7. **forward** — `exchange.rs`: the exchange with the backend runs in a tracked task that does
//!    not depend on the client's connection;
//! 8. **tee** — `tee.rs`: the response streams to the client and into the records.
//!
//! Each phase returns a result. An accepted request Tollgate answers itself (413, 408, 404, a
//! backend it could not reach) ends through `reject.rs::end_accepted`; the one refusal here
//! that records nothing is admission's 503: the recorder is what is full.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tollgate_records::{Body as RecordBody, RawRecord, RequestRecord};

use crate::AppState;
use crate::context::{self, Ctx};
use crate::error::ProxyError;
use crate::exchange;
use crate::peek;
use crate::pool::Plan;
use crate::quota;
use crate::reject::{Accepted, end_accepted};
use crate::stream_usage;

pub(crate) async fn handle(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(mut ctx) = context::from_parts(&mut parts) else {
        return ProxyError::Internal.into_response();
    };
    let accepted = match admit(&app, &mut ctx) {
        Ok(accepted) => accepted,
        Err(error) => return error.into_response(),
    };
    let bytes = match read_body(&app, body).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let records = vec![RawRecord::Request(ctx.request_record())];
            return end_accepted(&app, &ctx.info, records, 1, error, Vec::new(), accepted);
        }
    };
    let mut described = describe(&app, &ctx, &bytes);
    let routed = match route(&app, &ctx, described.model.clone(), described.stateful) {
        Ok(plan) => limit(&app, &mut ctx, &plan, &described, &bytes)
            .await
            .map(|()| plan),
        Err(error) => Err(error),
    };
    let plan = match routed {
        Ok(plan) => plan,
        Err(error) => {
            let end_seq = described.next_seq();
            let records = described.records();
            return end_accepted(
                &app,
                &ctx.info,
                records,
                end_seq,
                error,
                Vec::new(),
                accepted,
            );
        }
    };
    let outgoing = ask_for_usage(&plan, &ctx, &mut described, bytes);
    exchange::start(app, ctx, described, outgoing, plan, accepted).await
}

/// Operations whose tokens a limit counts (the ones AOAI bills by token).
const TOKEN_OPERATIONS: &[&str] = &["chat.completions", "completions", "embeddings", "responses"];

/// The limits phase (`quota.rs`): the consumer's counters, checked and taken at once; the
/// reservation rides in the context to the request's end.
async fn limit(
    app: &AppState,
    ctx: &mut Ctx,
    plan: &Plan,
    described: &Described,
    bytes: &[u8],
) -> Result<(), ProxyError> {
    let directory = app.directory.load();
    let Some(limits) = directory.limits.get(&ctx.consumer.id) else {
        return Ok(());
    };
    if let Some(budget) = limits.all.cost_per_month
        && let Some(retry_after) = app.spend.over(&ctx.consumer.id, budget)
    {
        return Err(ProxyError::ConsumerQuotaExceeded {
            limit: format!("{budget} cost per month"),
            retry_after,
        });
    }
    let deployment = described.record.deployment.as_deref();
    let billed =
        ctx.method == Method::POST && TOKEN_OPERATIONS.contains(&ctx.route.operation.as_str());
    let tokens = if billed && quota::counts_tokens(limits, deployment) {
        // A body serde cannot read (too deep, not JSON) is reserved at the default maximum.
        let body: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
        quota::estimate(
            deployment.unwrap_or_default(),
            &ctx.route.operation,
            &body,
            plan.live.config.quotas.default_max_tokens,
        )
    } else {
        0
    };
    match app
        .counters
        .reserve(&ctx.consumer.id, deployment, limits, tokens)
        .await
    {
        Ok((reservation, remaining)) => {
            ctx.quota = Some(quota::Hold::new(
                reservation,
                remaining,
                app.counters.clone(),
                app.requests.clone(),
            ));
            Ok(())
        }
        Err(quota::Refused::Limit(r)) if r.quota => Err(ProxyError::ConsumerQuotaExceeded {
            limit: r.limit,
            retry_after: r.retry_after,
        }),
        Err(quota::Refused::Limit(r)) => Err(ProxyError::ConsumerRateLimited {
            limit: r.limit,
            retry_after: r.retry_after,
        }),
        Err(quota::Refused::Unavailable) => Err(ProxyError::LimitsUnavailable),
    }
}

/// The usage phase: the body to send AOAI, with `stream_options.include_usage` added when the
/// request is a stream that may ask for it and does not (the record then says so).
fn ask_for_usage(
    plan: &Plan,
    ctx: &Ctx,
    described: &mut Described,
    bytes: Bytes,
) -> stream_usage::Outgoing {
    let unchanged = |body: Bytes| stream_usage::Outgoing {
        body,
        client_body: None,
    };
    let settings = &plan.live.config.stream_usage;
    let skipped = described
        .record
        .deployment
        .as_ref()
        .is_some_and(|d| settings.skip_deployments.contains(d));
    let v1 = ctx.route.body_names_deployment();
    if !settings.inject || skipped || !stream_usage::applies(&described.record, v1) {
        return unchanged(bytes);
    }
    match stream_usage::inject(&bytes) {
        Some(body) => {
            described.record.stream_usage_injected = true;
            stream_usage::Outgoing {
                body,
                client_body: Some(bytes),
            }
        }
        None => unchanged(bytes),
    }
}

/// Accepts the request when its records can be taken; the slot from the limits layer moves
/// into the accepted request and is held until its `end`.
fn admit(app: &AppState, ctx: &mut Ctx) -> Result<Accepted, ProxyError> {
    if !app.recorder.can_accept() {
        return Err(ProxyError::RecorderFull);
    }
    Ok(Accepted::new(app.recorder.begin(), ctx.slot.take()))
}

async fn read_body(app: &AppState, body: Body) -> Result<Bytes, ProxyError> {
    let limits = &app.config.limits;
    let limit = limits.max_request_body_bytes;
    let deadline = Duration::from_millis(limits.body_read_timeout_ms);
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ProxyError::RequestBodyTooLarge { limit }
            } else if client_went_away(&e) {
                ProxyError::ClientDisconnected
            } else {
                ProxyError::RequestBodyUnreadable(e.to_string())
            })
        }
        Err(_) => Err(ProxyError::RequestBodyTimeout {
            timeout_ms: limits.body_read_timeout_ms,
        }),
    }
}

/// Whether a body read failed because the connection ended before the body did (as opposed
/// to a malformed body from a client still there).
fn client_went_away(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        cause = e.source();
    }
    false
}

/// What the describe phase found: the `request` record, the `part` records of a body too
/// large for one document, and the body's `model` when it names one.
pub(crate) struct Described {
    pub record: RequestRecord,
    pub parts: Vec<RawRecord>,
    pub model: Option<String>,
    /// The call creates or continues state a backend keeps (a stored response or chat
    /// completion): it goes to the stateful backend, where later calls on its id go.
    pub stateful: bool,
}

impl Described {
    /// The records to write for the request, in seq order.
    pub(crate) fn records(self) -> Vec<RawRecord> {
        let mut records = Vec::with_capacity(1 + self.parts.len());
        records.push(RawRecord::Request(self.record));
        records.extend(self.parts);
        records
    }

    /// The seq just after the request's own records: where response segments start.
    pub(crate) fn next_seq(&self) -> u32 {
        self.parts.len() as u32 + 1
    }
}

fn describe(app: &AppState, ctx: &Ctx, bytes: &[u8]) -> Described {
    let mut record = ctx.request_record();
    let content_type = ctx
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let depth = app.config.limits.max_json_depth;
    let body = RecordBody::from_bytes_bounded(content_type, bytes, depth);
    let peeked = peek::peek(content_type, bytes, depth);
    record.stream = peeked.stream;
    // Stored unless `store: false` on the Responses API (AOAI's default), only with
    // `store: true` on chat completions.
    let stateful = peeked.continues
        || match ctx.route.operation.as_str() {
            "responses" => peeked.store != Some(false),
            _ => peeked.store == Some(true),
        };
    let model = peeked.model;
    if ctx.route.body_names_deployment() {
        record.deployment.clone_from(&model);
    }
    let mut parts = Vec::new();
    if bytes.len() > app.config.recorder.max_body_part_bytes {
        let (stub, pieces) = tollgate_records::split_body(
            &record.request_id,
            content_type,
            bytes,
            app.config.recorder.max_body_part_bytes,
        );
        record.body = stub;
        parts = pieces;
    } else {
        record.body = body;
    }
    Described {
        record,
        parts,
        model,
        stateful,
    }
}

/// The route phase: the backends to try, in order: the deployment's pool in the live
/// configuration, as `pool.rs` plans it. Calls that keep state on a backend (files, batches,
/// fine-tuning, assistants, threads, vector stores, stored responses and whatever names their
/// ids) go to the stateful backend alone, never balanced, so a later call on an id reaches the
/// backend that made it. The plan keeps the configuration for the request.
fn route(
    app: &AppState,
    ctx: &Ctx,
    model: Option<String>,
    stateful: bool,
) -> Result<Plan, ProxyError> {
    let live = app.live.load_full();
    let deployment = if ctx.route.body_names_deployment() {
        model
    } else {
        ctx.route.deployment.clone()
    };
    let order = match deployment {
        Some(d) => {
            let pool = live
                .config
                .routes
                .get(&d)
                .ok_or(ProxyError::DeploymentNotFound)?;
            if app
                .directory
                .load()
                .allowed
                .get(&ctx.consumer.id)
                .is_some_and(|allowed| !allowed.contains(&d))
            {
                return Err(ProxyError::DeploymentNotAllowed);
            }
            // A stored response or completion stays on the stateful backend when it serves
            // the deployment; otherwise the pool is all there is.
            let pinned = live
                .config
                .stateful
                .filter(|i| stateful && pool.contains(i));
            let pool = pinned
                .as_ref()
                .map_or(pool.as_slice(), std::slice::from_ref);
            app.pools.plan(&live, pool).map_err(|u| match u.throttled {
                true => ProxyError::AllBackendsResting {
                    retry_after: u.retry_after,
                },
                false => ProxyError::AllBackendsTripped {
                    retry_after: u.retry_after,
                },
            })?
        }
        // A call that names its deployment in the body must name one; it never falls through
        // to a default backend. A body-less GET or DELETE there reads or removes what a
        // backend stored (`GET /openai/v1/chat/completions` lists stored completions).
        None if ctx.route.body_names_deployment()
            && !matches!(ctx.method, Method::GET | Method::DELETE) =>
        {
            return Err(ProxyError::ModelMissing);
        }
        // Paths without a deployment (files, batches, …, a stored response by id).
        None => match live.config.stateful {
            Some(i) => vec![i],
            None => return Err(ProxyError::RouteNotFound),
        },
    };
    Ok(Plan { live, order })
}
