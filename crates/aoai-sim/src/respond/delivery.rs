//! How an answer reaches the client: slow first byte, time to first token, inter-token pacing,
//! and the injected resets that cut a stream or body short.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;

use super::frames::Frame;
use super::{Answer, Reply};
use crate::config::SimConfig;
use crate::fault::Fault;

/// Size of the pieces a cut non-stream body is sent in (`reset-after-chunks` counts these).
const CUT_PIECE_BYTES: usize = 64;

pub(crate) struct Latency {
    ttft: Duration,
    inter_token: Duration,
}

impl Latency {
    /// Configured latency, overridable per request with `x-sim-ttft-ms` and
    /// `x-sim-inter-token-ms`.
    pub(crate) fn from_request(config: &SimConfig, headers: &HeaderMap) -> Self {
        let ms = |name: &str, default: u64| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_millis(default), Duration::from_millis)
        };
        Latency {
            ttft: ms("x-sim-ttft-ms", config.time_to_first_token_ms),
            inter_token: ms("x-sim-inter-token-ms", config.inter_token_ms),
        }
    }
}

/// The `slow-first-byte` fault: holds everything, errors included, before the headers.
pub(crate) async fn slow_first_byte(fault: &Fault) {
    if let Some(delay) = fault.slow_first_byte {
        tokio::time::sleep(delay).await;
    }
}

/// A 200 carrying the answer after the time to first token: a JSON body (held for the whole
/// generation time) or an SSE stream (paced per content frame), cut short when
/// `reset_after_chunks` asks.
pub(crate) async fn deliver(answer: Answer, latency: &Latency, fault: &Fault) -> Response {
    if latency.ttft > Duration::ZERO {
        tokio::time::sleep(latency.ttft).await;
    }
    let mut response = match answer.reply {
        Reply::Json(value) => {
            let completion = answer.figures.completion;
            if latency.inter_token > Duration::ZERO && completion > 0 {
                tokio::time::sleep(latency.inter_token * completion as u32).await;
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
        reply @ (Reply::Stream(_) | Reply::Events(_)) => {
            let frames = match reply {
                Reply::Stream(plan) => plan.into_frames(&answer.figures),
                Reply::Events(frames) => frames,
                Reply::Json(_) => Vec::new(),
            };
            let mut resp = Response::new(stream_body(
                frames,
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
    response
}

fn reset_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected fault: connection reset",
    )
}

/// Sends the frames, pacing content frames by `inter_token`, and aborts the connection after
/// `reset_after` frames when asked.
fn stream_body(frames: Vec<Frame>, inter_token: Duration, reset_after: Option<usize>) -> Body {
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

/// A non-stream body cut after `chunks` pieces, then reset.
fn cut_body(bytes: Bytes, chunks: usize) -> Body {
    let pieces: Vec<Bytes> = bytes
        .chunks(CUT_PIECE_BYTES)
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
