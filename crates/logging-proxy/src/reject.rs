//! Reject-and-record, in one place: every request Tollgate answers itself ends here.
//!
//! - [`refuse`]: before admission (path, header size, authentication). Recorded as a bounded
//!   summary, and only while the recorder is not under pressure (nothing spooled): a caller
//!   without a key must not be able to fill the spool and so turn every real consumer away.
//!   When it is skipped, a counter says so.
//! - [`end_accepted`]: after admission. Always recorded, request and `end`, like any answer.

use std::sync::atomic::Ordering;

use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use tollgate_records::{
    Attempt, Body as RecordBody, Consumer, EndRecord, RawRecord, SCHEMA_VERSION,
};

use crate::AppState;
use crate::context::{self, Keep, RequestInfo};
use crate::error::ProxyError;
use crate::path::Route;
use crate::recorder::InFlight;
use crate::tee::{hand_over, millis};

/// What an accepted request holds until its `end` is handed over: the recorder's in-flight
/// mark (what `flush` waits for) and its slot of the concurrency limit.
#[expect(dead_code, reason = "held for their Drop")]
pub(crate) struct Accepted {
    pub inflight: InFlight,
    pub slot: Option<context::Slot>,
}

/// The `end` record of a request Tollgate answered itself.
fn end_record(
    info: &RequestInfo,
    seq: u32,
    error: &ProxyError,
    attempts: Vec<Attempt>,
) -> EndRecord {
    EndRecord {
        schema_version: SCHEMA_VERSION,
        request_id: info.request_id.to_string(),
        seq,
        time: Utc::now(),
        status: error.status().as_u16(),
        backend: attempts.last().map(|a| a.backend.clone()),
        attempts,
        ttfb_ms: None,
        total_ms: millis(info.started.elapsed()),
        headers: Default::default(),
        content_type: Some("application/json".into()),
        body: RecordBody::Empty,
        client_disconnected: matches!(error, ProxyError::ClientDisconnected),
        truncated: false,
        error: Some(error.info()),
        segments: 0,
        first_segment_seq: seq,
        response_bytes: 0,
    }
}

/// Answers a request refused before admission, recording a bounded summary when the recorder
/// has room to spare.
pub(crate) fn refuse(
    app: &AppState,
    info: &RequestInfo,
    parts: &Parts,
    route: Option<&Route>,
    error: ProxyError,
) -> Response {
    if app.recorder.has_room_for_refusals() {
        let seen = context::RequestSeen {
            info,
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            client_ip: context::client_ip(parts),
            route,
        };
        let request = context::request_record(&seen, Consumer::anonymous(), Keep::Summary);
        hand_over(&app.recorder, &app.requests, RawRecord::Request(request));
        let end = end_record(info, 1, &error, Vec::new());
        hand_over(&app.recorder, &app.requests, RawRecord::End(end));
    } else {
        app.stats
            .refusals_unrecorded
            .fetch_add(1, Ordering::Relaxed);
    }
    error.into_response()
}

/// Ends an accepted request Tollgate answers itself: hands over the request's records not yet
/// written (`records`: its `request` and `part` records, or none), its `end` at `end_seq`, then
/// releases the request.
pub(crate) fn end_accepted(
    app: &AppState,
    info: &RequestInfo,
    records: Vec<RawRecord>,
    end_seq: u32,
    error: ProxyError,
    attempts: Vec<Attempt>,
    accepted: Accepted,
) -> Response {
    for record in records {
        hand_over(&app.recorder, &app.requests, record);
    }
    let end = end_record(info, end_seq, &error, attempts);
    hand_over(&app.recorder, &app.requests, RawRecord::End(end));
    // Released after the end is handed over: that is what `flush` waits for.
    drop(accepted);
    error.into_response()
}
