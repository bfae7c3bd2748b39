//! The tee: the client's response body wraps the upstream body, passes each chunk to the
//! client untouched, and hands the bytes to the recorder as segments.
//!
//! Invariants:
//! - per chunk the work is O(chunk): the chunk's bytes are appended to the current segment and
//!   the refcounted `Bytes` goes to the client; nothing waits on the store (records are handed
//!   over with `try_record`, never awaited in the poll);
//! - **the response completes only once its records survive a SIGKILL.** When the response is
//!   about to complete — the upstream ended (the chunked terminator goes out after the body's
//!   `None`), or a chunk completes a body sized by `content-length` (the client then has
//!   everything, and hyper stops polling) — the tee first hands over the last segment and the
//!   `end` record, then holds that last chunk (or the `None`) until the journal has written the
//!   `end` record (a future polled inside `poll_next`, never blocking). Records are journaled in
//!   order, so the `end` being written means every record of the request is. First and
//!   intermediate chunks never wait; a failed or timed-out upstream (the client sees an error,
//!   not a complete response) and a drain after the client left do not wait either;
//! - the `end` record is emitted exactly once, when the upstream body ends, fails, times out,
//!   or the drain bound after a client disconnect is reached;
//! - a client that disconnects does not stop the reading: the task keeps reading the upstream
//!   (at most `max_drain_bytes` / `max_drain_ms` more) so AOAI's usage frame is still recorded;
//! - no client holds a request past the limits: one that stops reading is cut off by its
//!   connection's write timeout (`stall.rs`), and a response still going at `total_timeout_ms`
//!   (a slow reader, a slow upstream) is cut off and drained like a disconnect.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use tollgate_records::{
    Attempt, Body, ChunksRecord, EndRecord, ErrorInfo, ErrorSource, RawRecord, SCHEMA_VERSION,
    SegmentData,
};

use tokio_util::sync::CancellationToken;

use crate::config::{LimitsConfig, RecorderConfig};
use crate::recorder::{Journaled, Recorder};
use crate::reject::Accepted;

/// Cuts the response body into `chunks` records, or keeps a small non-stream body inline.
pub(crate) struct Segmenter {
    request_id: String,
    first_seq: u32,
    next_seq: u32,
    buf: Vec<u8>,
    arrivals: Vec<[u64; 2]>,
    segment_offset: u64,
    total: u64,
    segment_started_us: u64,
    max_bytes: usize,
    max_age_us: u64,
    /// While set, bytes accumulate up to this size for the `end` record's body.
    inline_max: Option<usize>,
}

impl Segmenter {
    /// Segments are numbered from `first_seq` (1, or after the request body's parts).
    pub(crate) fn new(
        request_id: String,
        first_seq: u32,
        config: &RecorderConfig,
        inline: bool,
    ) -> Self {
        Segmenter {
            request_id,
            first_seq,
            next_seq: first_seq,
            buf: Vec::new(),
            arrivals: Vec::new(),
            segment_offset: 0,
            total: 0,
            segment_started_us: 0,
            max_bytes: config.segment_max_bytes,
            max_age_us: config.segment_max_age_ms * 1000,
            inline_max: inline.then_some(config.max_inline_body_bytes),
        }
    }

    /// Adds a chunk that arrived `at_us` after the request; returns segments to record.
    pub(crate) fn push(&mut self, chunk: &[u8], at_us: u64) -> Vec<RawRecord> {
        if self.buf.is_empty() {
            self.segment_started_us = at_us;
        }
        self.buf.extend_from_slice(chunk);
        self.arrivals.push([at_us, chunk.len() as u64]);
        self.total += chunk.len() as u64;
        if let Some(max) = self.inline_max {
            if self.buf.len() <= max {
                return Vec::new();
            }
            // Too large to go inline: from here on it is recorded as segments.
            self.inline_max = None;
        }
        let mut out = Vec::new();
        while self.buf.len() >= self.max_bytes {
            let rest = self.buf.split_off(self.max_bytes);
            out.push(self.cut(rest));
        }
        if !self.buf.is_empty() && at_us.saturating_sub(self.segment_started_us) >= self.max_age_us
        {
            out.push(self.cut(Vec::new()));
        }
        out
    }

    fn cut(&mut self, rest: Vec<u8>) -> RawRecord {
        let data = std::mem::replace(&mut self.buf, rest);
        let arrivals = std::mem::take(&mut self.arrivals);
        let record = RawRecord::Chunks(ChunksRecord {
            schema_version: SCHEMA_VERSION,
            request_id: self.request_id.clone(),
            seq: self.next_seq,
            offset: self.segment_offset,
            data: SegmentData::from_bytes(&data),
            arrivals,
        });
        self.next_seq += 1;
        self.segment_offset += data.len() as u64;
        record
    }

    /// The last segment (if any), the inline body, the number of segments and total bytes.
    pub(crate) fn finish(
        mut self,
        content_type: Option<&str>,
    ) -> (Option<RawRecord>, Body, u32, u64) {
        if self.inline_max.is_some() {
            let body = Body::from_bytes(content_type, &self.buf);
            return (None, body, 0, self.total);
        }
        let last = (!self.buf.is_empty()).then(|| self.cut(Vec::new()));
        (
            last,
            Body::Empty,
            self.next_seq - self.first_seq,
            self.total,
        )
    }
}

/// Response headers worth keeping in the `end` record.
pub(crate) fn selected_headers(headers: &reqwest::header::HeaderMap) -> BTreeMap<String, String> {
    const KEEP: &[&str] = &[
        "apim-request-id",
        "x-request-id",
        "x-ms-client-request-id",
        "x-ms-region",
        "azureml-model-session",
        "azure-openai-deployment-utilization",
        "retry-after",
        "retry-after-ms",
        "x-ms-retry-after-ms",
        "openai-processing-ms",
        "x-ms-rai-invoked",
    ];
    headers
        .iter()
        .filter(|(k, _)| KEEP.contains(&k.as_str()) || k.as_str().starts_with("x-ratelimit-"))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Everything the tee needs to write the `end` record.
pub(crate) struct Exchange {
    pub request_id: String,
    pub started: Instant,
    pub status: u16,
    pub backend: String,
    pub attempts: Vec<Attempt>,
    pub ttfb_ms: f64,
    pub headers: BTreeMap<String, String>,
    pub content_type: Option<String>,
    /// The seq of the first response segment (after the request body's parts).
    pub first_segment_seq: u32,
    pub accepted: Accepted,
    pub price_multiplier: Option<f64>,
    /// The request's place on its backend (`max_concurrent_requests`), left at its end.
    #[expect(dead_code, reason = "held for its Drop, at the request's end")]
    pub backend_slot: crate::pool::Slot,
    /// The consumer's token reservation, settled at the end with the usage seen passing.
    pub quota: Option<crate::quota::Hold>,
}

pub(crate) fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

type Upstream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// What the tee carries from the first chunk to the `end` record.
struct Tee {
    upstream: Upstream,
    segmenter: Segmenter,
    ex: Exchange,
    recorder: Recorder,
    requests: TaskTracker,
    /// Fires when shutdown's grace is over: a drain still running stops and records.
    abort: CancellationToken,
    limits: LimitsConfig,
    deadline: Instant,
    error: Option<ErrorInfo>,
    truncated: bool,
    /// The upstream's `content-length`, and how much of it the client has been given: hyper
    /// stops polling (and drops the body) once a sized body is complete, which is not a
    /// disconnect.
    expected_len: Option<u64>,
    sent: u64,
    /// An upstream item read ahead (to learn whether the chunk before it was the last), not
    /// yet processed.
    ahead: Option<reqwest::Result<Bytes>>,
}

impl Tee {
    /// The next upstream item: the one read ahead, else the upstream's.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Option<reqwest::Result<Bytes>>> {
        match self.ahead.take() {
            Some(item) => Poll::Ready(Some(item)),
            None => self.upstream.as_mut().poll_next(cx),
        }
    }

    /// Records a chunk; whether it arrived past the total timeout.
    fn on_chunk(&mut self, chunk: &[u8]) -> bool {
        self.sent += chunk.len() as u64;
        if let Some(q) = self.ex.quota.as_mut() {
            q.push(chunk);
        }
        let at = micros_since(self.ex.started);
        for segment in self.segmenter.push(chunk, at) {
            self.recorder.record(segment);
        }
        at >= self.limits.total_timeout_ms.saturating_mul(1000)
    }

    /// The response is still going at the total timeout — an upstream sending slowly, or a
    /// client reading slowly (one that stops altogether is cut off sooner, by the connection's
    /// write timeout): the client is cut off and the rest of AOAI's answer is drained, within
    /// the drain bounds, so its usage is still recorded.
    fn cut_off(mut self) {
        self.error = Some(ErrorInfo {
            source: ErrorSource::Downstream,
            code: "TotalTimeout".into(),
            message: "The response was still being sent at the total timeout; the client was cut off and the rest of the answer drained.".into(),
        });
        // The drain has its own bounds; the passed total deadline must not end it at once.
        self.deadline = Instant::now() + Duration::from_millis(self.limits.max_drain_ms);
        let requests = self.requests.clone();
        requests.spawn(drain(self, true));
    }

    fn fail(&mut self, code: &str, message: String) {
        self.error = Some(ErrorInfo {
            source: ErrorSource::Upstream,
            code: code.into(),
            message,
        });
        self.truncated = true;
    }

    /// Records which of the two timeouts fired.
    fn timed_out(&mut self) {
        let what = if Instant::now() >= self.deadline {
            "total"
        } else {
            "idle"
        };
        self.fail(
            "BackendTimeout",
            format!("Upstream body exceeded the {what} timeout."),
        );
    }

    /// The next wake-up for the silence and total timeouts.
    fn timer_deadline(&self) -> Instant {
        (Instant::now() + Duration::from_millis(self.limits.idle_timeout_ms)).min(self.deadline)
    }

    /// Whether the client has the whole body once the chunks so far are delivered: the
    /// upstream's `content-length` is reached.
    fn sized_body_complete(&self) -> bool {
        self.expected_len.is_some_and(|n| self.sent >= n)
    }

    /// Writes the last segment and the `end` record; the request is then done. The `end`'s
    /// ticket: once it is journaled, so is every record of the request (the journal keeps the
    /// order records were handed over in).
    fn finish(self, client_disconnected: bool) -> Journaled {
        let Tee {
            segmenter,
            ex,
            recorder,
            error,
            truncated,
            ..
        } = self;
        let (last, inline_body, segments, response_bytes) =
            segmenter.finish(ex.content_type.as_deref());
        if let Some(segment) = last {
            recorder.record(segment);
        }
        let end = EndRecord {
            schema_version: SCHEMA_VERSION,
            request_id: ex.request_id,
            seq: ex.first_segment_seq + segments,
            time: chrono::Utc::now(),
            status: ex.status,
            backend: Some(ex.backend),
            attempts: ex.attempts,
            price_multiplier: ex.price_multiplier,
            ttfb_ms: Some(ex.ttfb_ms),
            total_ms: millis(ex.started.elapsed()),
            headers: ex.headers,
            content_type: ex.content_type,
            body: inline_body,
            client_disconnected,
            truncated,
            error,
            segments,
            first_segment_seq: ex.first_segment_seq,
            response_bytes,
        };
        let ticket = recorder.record(RawRecord::End(end));
        if let Some(q) = ex.quota {
            q.settle(ex.status);
        }
        // Released after the end record is handed over: that is what `flush` waits for.
        ex.accepted.release();
        ticket
    }
}

/// Tollgate's own answer (a refusal, a backend failure) once its `end` is handed over: the
/// headers go out at once, the body (small, sized: its length stays exact, so hyper still sends
/// `content-length`) is held until the journal has written the `end`, so this response too is
/// complete only once its records survive a SIGKILL.
pub(crate) fn after_journaled(
    recorder: &Recorder,
    ticket: Journaled,
    response: axum::response::Response,
) -> axum::response::Response {
    match recorder.journaled(ticket) {
        Some(journaled) => response.map(|body| {
            axum::body::Body::new(Held {
                journaled: Some(journaled),
                body,
            })
        }),
        None => response,
    }
}

/// A body whose first frame waits for the journal.
struct Held {
    journaled: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    body: axum::body::Body,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Some(journaled) = self.journaled.as_mut() {
            ready!(journaled.as_mut().poll(cx));
            self.journaled = None;
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        // Not ended while held: hyper must poll it, even for an empty body.
        self.journaled.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The end of a response, held until its `end` record is journaled.
struct Closing {
    journaled: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The chunk that completes a sized body, or `None` for the end of the stream.
    last: Option<Bytes>,
}

/// The client's response body: polled by the client's connection, it yields each upstream chunk
/// untouched and records it on the way. If the client goes away first, `Drop` moves the rest of
/// the reading into a tracked task ([`drain`]), so what AOAI still sends — its usage frame
/// above all — is recorded.
pub(crate) struct TeeBody {
    tee: Option<Tee>,
    timer: Pin<Box<Sleep>>,
    /// Recording is done; the response's end waits for the journal.
    closing: Option<Closing>,
    /// What [`TeeBody::prime`] read ahead, yielded first.
    primed: Option<Option<Result<Bytes, io::Error>>>,
    recorder: Recorder,
}

impl TeeBody {
    pub(crate) fn new(
        upstream: reqwest::Response,
        ex: Exchange,
        recorder: Recorder,
        requests: TaskTracker,
        abort: CancellationToken,
        limits: LimitsConfig,
        recorder_config: &RecorderConfig,
    ) -> Self {
        let streamed = tollgate_records::is_event_stream(ex.content_type.as_deref());
        let segmenter = Segmenter::new(
            ex.request_id.clone(),
            ex.first_segment_seq,
            recorder_config,
            !streamed,
        );
        let deadline = ex.started + Duration::from_millis(limits.total_timeout_ms);
        let expected_len = upstream.content_length();
        let tee = Tee {
            expected_len,
            sent: 0,
            ahead: None,
            upstream: Box::pin(upstream.bytes_stream()),
            segmenter,
            ex,
            recorder,
            requests,
            abort,
            limits,
            deadline,
            error: None,
            truncated: false,
        };
        let timer = Box::pin(tokio::time::sleep_until(tee.timer_deadline()));
        TeeBody {
            recorder: tee.recorder.clone(),
            tee: Some(tee),
            timer,
            closing: None,
            primed: None,
        }
    }

    /// For a body sized by `content-length`, reads ahead until the client's first item is
    /// ready — for a non-stream answer (one chunk, the whole body) that is after its `end` is
    /// journaled — before the response goes to the server. The server writes a response's
    /// head and first chunk together only when the body is ready at its first poll; otherwise
    /// it flushes the head alone, and the held body costs a second write and packet. Chunked
    /// bodies (streams) are not read ahead: their first bytes go out as they arrive. Gives up
    /// (nothing lost: the body reads on as usual) when Tollgate shuts down.
    pub(crate) async fn prime(&mut self) {
        let Some(abort) = self
            .tee
            .as_ref()
            .filter(|t| t.expected_len.is_some())
            .map(|t| t.abort.clone())
        else {
            return;
        };
        let first = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx));
        tokio::select! {
            item = first => self.primed = Some(item),
            () = abort.cancelled() => {}
        }
    }

    /// Ends the response with `last` (a final chunk, or `None`) once `ticket` is journaled.
    fn close(
        &mut self,
        ticket: Journaled,
        last: Option<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, io::Error>>> {
        let Some(mut journaled) = self.recorder.journaled(ticket) else {
            return Poll::Ready(last.map(Ok));
        };
        if journaled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(last.map(Ok));
        }
        self.closing = Some(Closing { journaled, last });
        Poll::Pending
    }
}

impl Stream for TeeBody {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(item) = this.primed.take() {
            return Poll::Ready(item);
        }
        if let Some(closing) = this.closing.as_mut() {
            ready!(closing.journaled.as_mut().poll(cx));
            let last = this.closing.take().and_then(|c| c.last);
            return Poll::Ready(last.map(Ok));
        }
        let Some(tee) = this.tee.as_mut() else {
            return Poll::Ready(None);
        };
        match tee.poll_upstream(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if tee.on_chunk(&chunk) {
                    if let Some(tee) = this.tee.take() {
                        tee.cut_off();
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "response past the total timeout",
                    ))));
                }
                let last = tee.sized_body_complete() || {
                    // A look ahead: when the upstream has already ended, this chunk is the last
                    // one, and it is held with the end, so the chunked terminator follows it in
                    // the same write instead of a write of its own after the journal's.
                    match tee.upstream.as_mut().poll_next(cx) {
                        Poll::Ready(None) => true,
                        Poll::Ready(Some(item)) => {
                            tee.ahead = Some(item);
                            false
                        }
                        Poll::Pending => false,
                    }
                };
                if !last {
                    let next = tee.timer_deadline();
                    this.timer.as_mut().reset(next);
                    return Poll::Ready(Some(Ok(chunk)));
                }
                // The client has everything once this chunk (and, chunked, the terminator) is
                // out: the end is recorded now and the chunk waits for it.
                match this.tee.take() {
                    Some(tee) => {
                        let ticket = tee.finish(false);
                        this.close(ticket, Some(chunk), cx)
                    }
                    None => Poll::Ready(Some(Ok(chunk))),
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tee.fail("BackendStreamBroken", format!("Upstream body failed: {e}"));
                if let Some(tee) = this.tee.take() {
                    tee.finish(false);
                }
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "upstream body failed",
                ))))
            }
            Poll::Ready(None) => match this.tee.take() {
                // The terminator of a chunked body goes out after this `None`.
                Some(tee) => {
                    let ticket = tee.finish(false);
                    this.close(ticket, None, cx)
                }
                None => Poll::Ready(None),
            },
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if Instant::now() >= tee.deadline {
                    // The total timeout: the answer may still come, and AOAI bills it.
                    if let Some(tee) = this.tee.take() {
                        tee.cut_off();
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "response past the total timeout",
                    ))));
                }
                // Silent for the idle timeout: the upstream is presumed dead.
                tee.timed_out();
                if let Some(tee) = this.tee.take() {
                    tee.finish(false);
                }
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream idle timeout",
                ))))
            }
        }
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        let Some(mut tee) = self.tee.take() else {
            return;
        };
        // Dropped before the upstream ended: the client went away, unless it already had the
        // whole sized body.
        let disconnected = tee.expected_len != Some(tee.sent);
        if tokio::runtime::Handle::try_current().is_ok() {
            let requests = tee.requests.clone();
            requests.spawn(drain(tee, disconnected));
        } else {
            tee.truncated = true;
            tee.finish(disconnected);
        }
    }
}

/// Reads the rest of the upstream once the client stopped polling (it left, or it already had a
/// complete sized body), within `max_drain_bytes` and `max_drain_ms` (and the usual timeouts),
/// then records the end.
async fn drain(mut tee: Tee, client_disconnected: bool) {
    let since = Instant::now();
    let drain_until = since + Duration::from_millis(tee.limits.max_drain_ms);
    let mut drained = 0u64;
    loop {
        let wait_until = tee.timer_deadline().min(drain_until);
        let abort = tee.abort.clone();
        let upstream = std::future::poll_fn(|cx| tee.poll_upstream(cx));
        let next = tokio::select! {
            next = tokio::time::timeout_at(wait_until, upstream) => next,
            () = abort.cancelled() => {
                tee.fail("ShuttingDown", "Tollgate shut down before the upstream ended.".into());
                break;
            }
        };
        let next = match next {
            Ok(next) => next,
            Err(_) => {
                if Instant::now() >= drain_until {
                    tee.truncated = true;
                } else {
                    tee.timed_out();
                }
                break;
            }
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
                // Past the total timeout only matters to a client; the drain has its bounds.
                let _ = tee.on_chunk(&chunk);
                drained += chunk.len() as u64;
                if drained > tee.limits.max_drain_bytes {
                    tee.truncated = true;
                    break;
                }
            }
            Some(Err(e)) => {
                tee.fail("BackendStreamBroken", format!("Upstream body failed: {e}"));
                break;
            }
        }
    }
    tee.finish(client_disconnected);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::{FutureExt, StreamExt};
    use proptest::prelude::*;
    use tollgate_store::{RawWriter, StoreError};

    use super::*;
    use crate::recorder::spool;
    use crate::recorder::spool::tests::{Gate, open_gate};

    /// Takes everything, keeps nothing.
    struct Discard;

    #[async_trait::async_trait]
    impl RawWriter for Discard {
        async fn append(&self, _batch: &[RawRecord]) -> Result<(), StoreError> {
            Ok(())
        }
    }

    struct Rig {
        recorder: Recorder,
        gate: Gate,
        tracker: TaskTracker,
        cancel: CancellationToken,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        // A journal that has not written yet, until the test opens the gate.
        let gate = spool::tests::gate();
        let journal_opener = spool::tests::gated_opener(&gate, None);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let recorder = Recorder::start_with(
            crate::recorder::test_settings(dir.path()),
            Arc::new(Discard),
            &tracker,
            cancel.clone(),
            spool::file_opener(),
            journal_opener,
        )
        .unwrap();
        Rig {
            recorder,
            gate,
            tracker,
            cancel,
            _dir: dir,
        }
    }

    impl Rig {
        fn body(&self, upstream: http::Response<reqwest::Body>) -> TeeBody {
            let content_type = Some("text/event-stream".to_owned());
            let ex = Exchange {
                request_id: "tee".into(),
                started: Instant::now(),
                status: 200,
                backend: "b".into(),
                attempts: Vec::new(),
                ttfb_ms: 0.0,
                headers: BTreeMap::new(),
                content_type,
                first_segment_seq: 1,
                accepted: Accepted::new(self.recorder.begin(), None),
                price_multiplier: None,
                backend_slot: Default::default(),
                quota: None,
            };
            TeeBody::new(
                reqwest::Response::from(upstream),
                ex,
                self.recorder.clone(),
                TaskTracker::new(),
                CancellationToken::new(),
                LimitsConfig::default(),
                &RecorderConfig::default(),
            )
        }

        async fn shutdown(self) {
            open_gate(&self.gate);
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
        }
    }

    impl Drop for Rig {
        /// A failed test must not leave the journal thread blocked: the runtime waits for it.
        fn drop(&mut self) {
            open_gate(&self.gate);
        }
    }

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("in time")
    }

    /// Defect: the response completed while its records were only in memory, so a SIGKILL
    /// right after lost the records of a response the client had in full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunked_body_ends_only_once_its_end_record_is_journaled() {
        let rig = rig();
        // Chunks as the test sends them; the upstream ends when the sender is dropped.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, io::Error>>();
        let chunks =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            );
        let upstream = http::Response::new(reqwest::Body::wrap_stream(chunks));
        let mut body = rig.body(upstream);
        // The journal writes nothing yet; the chunks still go out at once.
        for chunk in [&b"data: a\n\n"[..], b"data: b\n\n"] {
            tx.send(Ok(Bytes::from_static(chunk))).unwrap();
            let got = within(body.next()).await.unwrap().unwrap();
            assert_eq!(&got[..], chunk);
        }
        // The upstream ends after the last chunk went out: the end of the body waits.
        drop(tx);
        let mut end = body.next();
        assert!((&mut end).now_or_never().is_none(), "held for the journal");
        open_gate(&rig.gate);
        assert!(within(end).await.is_none(), "ends once journaled");
        assert!(
            rig.recorder
                .stats()
                .journaled
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        rig.shutdown().await;
    }

    /// When the upstream has already ended as its last chunk is read, that chunk is held with
    /// the end, so the terminator can follow it in one write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_chunk_is_held_when_the_upstream_has_already_ended() {
        let rig = rig();
        let chunks: Vec<Result<Bytes, io::Error>> = vec![
            Ok(Bytes::from_static(b"data: a\n\n")),
            Ok(Bytes::from_static(b"data: [DONE]\n\n")),
        ];
        let upstream = http::Response::new(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
        let mut body = rig.body(upstream);
        let first = within(body.next()).await.unwrap().unwrap();
        assert_eq!(&first[..], b"data: a\n\n", "not the last: at once");
        let mut last = body.next();
        assert!(
            (&mut last).now_or_never().is_none(),
            "the last chunk is held"
        );
        assert_eq!(
            rig.recorder.in_flight(),
            0,
            "the end record was handed over"
        );
        open_gate(&rig.gate);
        let last = within(last).await.unwrap().unwrap();
        assert_eq!(&last[..], b"data: [DONE]\n\n");
        assert!(
            body.next().now_or_never().expect("at once").is_none(),
            "then the end, at once"
        );
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tollgates_own_answer_is_held_until_its_end_is_journaled() {
        use axum::response::IntoResponse;
        use http_body_util::BodyExt;

        let rig = rig();
        let ticket = rig
            .recorder
            .try_record(tollgate_store::conformance::sample_request("own"))
            .unwrap();
        let answer = crate::error::ProxyError::RecorderFull.into_response();
        let len = http_body::Body::size_hint(answer.body()).exact();
        let held = after_journaled(&rig.recorder, ticket, answer);
        assert_eq!(
            http_body::Body::size_hint(held.body()).exact(),
            len,
            "still sized: content-length is kept"
        );
        let mut body = held.into_body();
        let mut frame = body.frame();
        assert!(
            (&mut frame).now_or_never().is_none(),
            "held for the journal"
        );
        open_gate(&rig.gate);
        let data = within(frame).await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&data).contains("error"));
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_primed_sized_body_is_ready_at_the_first_poll_once_journaled() {
        let rig = rig();
        let upstream = http::Response::new(reqwest::Body::from("{\"ok\":true}"));
        let mut body = rig.body(upstream);
        let mut prime = Box::pin(body.prime());
        assert!(
            (&mut prime).now_or_never().is_none(),
            "priming waits for the journal"
        );
        open_gate(&rig.gate);
        within(prime).await;
        // The server's first poll finds the whole body: head and body go out together.
        let first = body.next().now_or_never().expect("ready at the first poll");
        assert_eq!(&first.unwrap().unwrap()[..], b"{\"ok\":true}");
        assert!(within(body.next()).await.is_none());
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunked_body_is_not_primed() {
        let rig = rig();
        let chunks: Vec<Result<Bytes, io::Error>> = vec![Ok(Bytes::from_static(b"data: a\n\n"))];
        let upstream = http::Response::new(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
        let mut body = rig.body(upstream);
        within(body.prime()).await;
        assert!(body.primed.is_none(), "streams are not read ahead");
        rig.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_chunk_that_completes_a_sized_body_waits_for_the_journal() {
        let rig = rig();
        // One chunk, with its length known: `content-length` on the wire.
        let upstream = http::Response::new(reqwest::Body::from("{\"ok\":true}"));
        let mut body = rig.body(upstream);
        let mut last = body.next();
        assert!(
            (&mut last).now_or_never().is_none(),
            "the completing chunk is held"
        );
        open_gate(&rig.gate);
        let chunk = within(last).await.unwrap().unwrap();
        assert_eq!(&chunk[..], b"{\"ok\":true}");
        assert!(within(body.next()).await.is_none());
        rig.shutdown().await;
    }

    fn config(max: usize, age_ms: u64, inline: usize) -> RecorderConfig {
        RecorderConfig {
            segment_max_bytes: max,
            segment_max_age_ms: age_ms,
            max_inline_body_bytes: inline,
            ..Default::default()
        }
    }

    fn bytes_of(records: &[RawRecord]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| match r {
                RawRecord::Chunks(c) => c.data.to_bytes().unwrap(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn segments_by_size_and_age() {
        let mut s = Segmenter::new("r".into(), 1, &config(10, 5, 0), false);
        assert!(s.push(b"abc", 0).is_empty());
        let cut = s.push(b"defghijklmn", 1000);
        assert_eq!(cut.len(), 1);
        let aged = s.push(b"o", 6000);
        assert_eq!(aged.len(), 1, "segment older than max age is cut");
        let (last, body, n, total) = s.finish(None);
        assert!(last.is_none());
        assert_eq!(body, Body::Empty);
        assert_eq!(n, 2);
        assert_eq!(total, 15);
    }

    #[test]
    fn small_non_stream_body_stays_inline_and_large_spills() {
        let mut s = Segmenter::new("r".into(), 1, &config(4, 1000, 8), true);
        assert!(s.push(br#"{"a":1}"#, 0).is_empty());
        let (_, body, n, _) = s.finish(Some("application/json"));
        assert_eq!(n, 0);
        assert!(matches!(body, Body::Json { .. }));

        let mut s = Segmenter::new("r".into(), 1, &config(4, 1000, 8), true);
        let mut recs = s.push(b"0123456789", 0);
        let (last, body, n, _) = s.finish(Some("application/json"));
        recs.extend(last);
        assert_eq!(body, Body::Empty);
        assert_eq!(n as usize, recs.len());
        assert_eq!(bytes_of(&recs), b"0123456789");
    }

    proptest! {
        #[test]
        fn segments_preserve_every_byte_in_order(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..30), max in 1usize..40) {
            let mut s = Segmenter::new("r".into(), 1, &config(max, 1_000_000, 0), false);
            let mut recs = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                recs.extend(s.push(c, i as u64));
            }
            let (last, _, n, total) = s.finish(None);
            recs.extend(last);
            let expected: Vec<u8> = chunks.concat();
            prop_assert_eq!(bytes_of(&recs), expected.clone());
            prop_assert_eq!(n as usize, recs.len());
            prop_assert_eq!(total as usize, expected.len());
            let seqs: Vec<u32> = recs.iter().map(RawRecord::seq).collect();
            prop_assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
        }
    }
}
