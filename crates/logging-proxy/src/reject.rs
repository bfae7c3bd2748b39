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
use crate::recorder::{InFlight, Recorder};
use crate::tee::{after_journaled, millis};

/// What an accepted request holds until its `end` is handed over: the recorder's in-flight
/// mark (what `flush` waits for) and its slot of the concurrency limit. Once its records are
/// handed over it is also the guarantee of exactly one `end`: dropped without
/// [`Accepted::release`] (a panic, a task cut at shutdown), it writes the end itself, marked as
/// Tollgate's failure, so the request is consolidated at once with its consumer instead of
/// waiting out the parser's incomplete deadline.
pub(crate) struct Accepted {
    #[expect(dead_code, reason = "held for its Drop, after the end is handed over")]
    inflight: InFlight,
    #[expect(dead_code, reason = "held for its Drop, after the end is handed over")]
    slot: Option<context::Slot>,
    open: Option<OpenRequest>,
}

/// What the fallback `end` needs.
struct OpenRequest {
    recorder: Recorder,
    info: RequestInfo,
    end_seq: u32,
}

impl Accepted {
    pub(crate) fn new(inflight: InFlight, slot: Option<context::Slot>) -> Self {
        Accepted {
            inflight,
            slot,
            open: None,
        }
    }

    /// The request's own records are handed over; its `end` will be `end_seq`.
    pub(crate) fn recorded(&mut self, recorder: &Recorder, info: &RequestInfo, end_seq: u32) {
        self.open = Some(OpenRequest {
            recorder: recorder.clone(),
            info: info.clone(),
            end_seq,
        });
    }

    /// The `end` is handed over: the request is done.
    pub(crate) fn release(mut self) {
        self.open = None;
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        // The fields (in-flight mark, slot) drop after this body: `flush` sees the end first.
        if let Some(open) = self.open.take() {
            tracing::error!(
                request_id = %open.info.request_id,
                "An accepted request ended without its end record; recording it as failed."
            );
            let end = end_record(&open.info, open.end_seq, &ProxyError::Internal, Vec::new());
            open.recorder.record(RawRecord::End(end));
        }
    }
}

/// The `end` record of a request Tollgate answered itself.
fn end_record(
    info: &RequestInfo,
    seq: u32,
    error: &ProxyError,
    attempts: Vec<Attempt>,
) -> EndRecord {
    EndRecord {
        price_multiplier: None,
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
        app.recorder.record(RawRecord::Request(request));
        let end = end_record(info, 1, &error, Vec::new());
        let ticket = app.recorder.record(RawRecord::End(end));
        // Complete only once its records survive a kill, like every recorded answer.
        return after_journaled(&app.recorder, ticket, error.into_response());
    }
    app.stats
        .refusals_unrecorded
        .fetch_add(1, Ordering::Relaxed);
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
        app.recorder.record(record);
    }
    let end = end_record(info, end_seq, &error, attempts);
    let ticket = app.recorder.record(RawRecord::End(end));
    // Released after the end is handed over: that is what `flush` waits for.
    accepted.release();
    // Complete only once its records survive a kill, like every recorded answer.
    after_journaled(&app.recorder, ticket, error.into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use tokio_util::sync::CancellationToken;
    use tollgate_store::{RawWriter, StoreError};

    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<RawRecord>>);

    #[async_trait]
    impl RawWriter for Collect {
        async fn append(&self, batch: &[RawRecord]) -> Result<(), StoreError> {
            self.0.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    /// Review finding: an accepted request whose task ended without writing its `end` (a
    /// panic, a task cut at shutdown) had none, and waited out the parser's deadline.
    #[tokio::test]
    async fn an_accepted_request_always_gets_exactly_one_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Collect::default());
        let tracker = tokio_util::task::TaskTracker::new();
        let cancel = CancellationToken::new();
        let recorder = Recorder::start(
            crate::recorder::test_settings(dir.path()),
            store.clone(),
            &tracker,
            cancel.clone(),
        )
        .unwrap();

        // Dropped before any of its records: nothing was recorded, nothing to end.
        drop(Accepted::new(recorder.begin(), None));
        // Dropped after its records, without an end: the guard writes it.
        let abandoned = RequestInfo::new();
        let mut a = Accepted::new(recorder.begin(), None);
        a.recorded(&recorder, &abandoned, 3);
        drop(a);
        // Ended normally: released, no second end.
        let finished = RequestInfo::new();
        let mut b = Accepted::new(recorder.begin(), None);
        b.recorded(&recorder, &finished, 1);
        b.release();

        recorder.flush().await;
        let ends: Vec<EndRecord> = store
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                RawRecord::End(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(ends.len(), 1, "{ends:?}");
        assert_eq!(ends[0].request_id, abandoned.request_id.to_string());
        assert_eq!((ends[0].seq, ends[0].status), (3, 500));
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
