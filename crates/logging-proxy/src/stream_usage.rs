//! The usage phase: AOAI reports a stream's usage only when the request asks for it
//! (`stream_options.include_usage`), and most clients do not ask, which leaves the bill to a
//! tiktoken estimate. For a chat or completions stream on an api-version that accepts the
//! option, the proxy asks on the client's behalf, records that it did, and takes the extra
//! usage frame (`"choices": []` with a `usage` object, just before `[DONE]`) out of what the
//! client receives; every other byte reaches the client as AOAI sent it. The request record
//! keeps the body as the client sent it.
//!
//! Off for a deployment listed in `proxy.stream_usage.skip_deployments` (a backend that rejects
//! the option), and when `proxy.stream_usage.inject` is false; a backend configured with
//! `include_usage = false` gets the client's own body (its attempt in the `end` record says
//! so). A backend that answers the option with a 400 naming it gets the request again as the
//! client sent it (both attempts are in the `end` record), so asking never costs the client its
//! answer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde_json::Value;
use serde_json::value::RawValue;
use tollgate_records::RequestRecord;

/// What the forward phase sends.
pub(crate) struct Outgoing {
    pub(crate) body: Bytes,
    /// The client's own body, when the usage phase changed it: sent instead if the backend
    /// answers that it does not know `stream_options`.
    pub(crate) client_body: Option<Bytes>,
}

/// Largest error body read to see whether a 400 is about `stream_options` (AOAI's are a few
/// hundred bytes).
pub(crate) const MAX_REJECTION_BYTES: u64 = 64 * 1024;

/// Whether a backend's 400 body says it does not know `stream_options`.
pub(crate) fn rejects_stream_options(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"stream_options").is_some()
}

/// The first dated api-version whose `stream_options` AOAI documents (2024-09-01-preview; GA
/// from 2024-10-21). Older versions answer 400 `unknown_parameter`.
const FIRST_API_VERSION: &str = "2024-09-01";

/// Whether this request may be asked for its stream usage.
pub(crate) fn applies(record: &RequestRecord, v1: bool) -> bool {
    record.stream
        && matches!(
            record.operation.as_str(),
            "chat.completions" | "completions"
        )
        && (v1
            || record
                .api_version
                .as_deref()
                .is_some_and(accepts_stream_options))
}

/// `YYYY-MM-DD[-preview]` on or after [`FIRST_API_VERSION`]; anything else is left alone.
fn accepts_stream_options(api_version: &str) -> bool {
    let date = api_version.get(..10).unwrap_or("");
    let well_formed = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    well_formed && date >= FIRST_API_VERSION
}

/// The body with `stream_options.include_usage` set, or `None` when the client already asked
/// for usage (nothing to take out of its stream) or the body is not a JSON object.
pub(crate) fn inject(body: &[u8]) -> Option<Bytes> {
    let members: std::collections::HashMap<String, &RawValue> =
        serde_json::from_slice(body).ok()?;
    let Some(options) = members.get("stream_options") else {
        // The common case: add the member after `{` and keep every other byte as sent.
        return Some(prepend_member(body));
    };
    let mut options: Value = serde_json::from_str(options.get()).ok()?;
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    // `stream_options` is there without `include_usage: true`: set it, keeping the client's
    // other options (`null` or a non-object the backend would reject anyway: left alone).
    // Rewriting the object loses only insignificant whitespace.
    options
        .as_object_mut()?
        .insert("include_usage".into(), Value::Bool(true));
    let mut fields: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    fields.insert("stream_options".into(), options);
    serde_json::to_vec(&fields).ok().map(Bytes::from)
}

/// `body`, a JSON object, with the member added first.
fn prepend_member(body: &[u8]) -> Bytes {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = BytesMut::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(MEMBER);
    if !empty {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(rest);
    out.freeze()
}

/// The client's side of an injected stream: AOAI's bytes, less the usage frame. Holds only
/// the bytes of an event not yet complete, so nothing waits longer than its own event.
pub(crate) struct WithoutUsageFrame<S> {
    inner: S,
    /// Bytes of the event being received (everything before it has been passed on).
    pending: BytesMut,
    done: bool,
}

impl<S> WithoutUsageFrame<S> {
    pub(crate) fn new(inner: S) -> Self {
        WithoutUsageFrame {
            inner,
            pending: BytesMut::new(),
            done: false,
        }
    }

    /// Takes the complete events out of `pending`, less the usage frame.
    fn complete_events(&mut self) -> Option<Bytes> {
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if !is_usage_frame(&event) {
                out.extend_from_slice(&event);
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }
}

impl<S, E> Stream for WithoutUsageFrame<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.pending.extend_from_slice(&bytes);
                    if let Some(out) = self.complete_events() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.done = true;
                    // A cut stream's last, unfinished event goes out as it came.
                    let rest = std::mem::take(&mut self.pending);
                    if !rest.is_empty() && !is_usage_frame(&rest) {
                        return Poll::Ready(Some(Ok(rest.freeze())));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The end of the first complete event in `buf` (after its blank line), if there is one.
/// Lines end with LF, CRLF or CR (WHATWG "Parsing an event stream").
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_start = 0;
    while i < buf.len() {
        let b = buf[i];
        if b == b'\n' || b == b'\r' {
            // A CR at the end may be half of a CRLF: wait for the next byte.
            if b == b'\r' && i + 1 == buf.len() {
                return None;
            }
            let next = if b == b'\r' && buf[i + 1] == b'\n' {
                i + 2
            } else {
                i + 1
            };
            if i == line_start && line_start > 0 {
                return Some(next);
            }
            line_start = next;
            i = next;
        } else {
            i += 1;
        }
    }
    None
}

/// Whether one event is the usage frame: its data is a JSON object with `"choices": []` and a
/// `usage` object. Azure's first frame (prompt filter results) also has empty `choices`, but
/// `"usage": null`, and goes to the client.
fn is_usage_frame(event: &[u8]) -> bool {
    // Cheap test first: every chunk of an injected stream has `"usage":null`; only the frame
    // we look for has an object there.
    let Some(at) = memchr::memmem::find(event, b"\"usage\"") else {
        return false;
    };
    let after = event[at + 7..]
        .iter()
        .find(|b| !(b.is_ascii_whitespace() || **b == b':'));
    if after != Some(&b'{') {
        return false;
    }
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    let Ok(v) = serde_json::from_str::<Value>(&data) else {
        return false;
    };
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(Value::is_object)
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    const FRAMES: &[&str] = &[
        "data: {\"choices\":[],\"prompt_filter_results\":[],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n",
        "data: [DONE]\n\n",
    ];

    async fn filtered(pieces: Vec<Vec<u8>>) -> Vec<u8> {
        let stream = futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
        );
        let mut out = Vec::new();
        let mut s = WithoutUsageFrame::new(stream);
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn only_the_usage_frame_is_taken_out_however_the_bytes_are_cut() {
        let all: Vec<u8> = FRAMES.concat().into_bytes();
        let mut expected = Vec::new();
        for (i, f) in FRAMES.iter().enumerate() {
            if i != 3 {
                expected.extend_from_slice(f.as_bytes());
            }
        }
        // Whole, one byte at a time, and cut at every point.
        assert_eq!(filtered(vec![all.clone()]).await, expected);
        assert_eq!(
            filtered(all.iter().map(|b| vec![*b]).collect()).await,
            expected
        );
        for cut in 1..all.len() {
            let pieces = vec![all[..cut].to_vec(), all[cut..].to_vec()];
            assert_eq!(filtered(pieces).await, expected, "cut at {cut}");
        }
        // CRLF line ends too.
        let crlf = FRAMES.concat().replace('\n', "\r\n").into_bytes();
        let expected_crlf = String::from_utf8(expected.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        assert_eq!(filtered(vec![crlf]).await, expected_crlf);
    }

    #[tokio::test]
    async fn a_cut_stream_keeps_its_unfinished_tail() {
        let cut = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"H";
        let bytes = format!("{}{cut}", FRAMES[1]).into_bytes();
        assert_eq!(filtered(vec![bytes.clone()]).await, bytes);
    }

    #[test]
    fn the_member_is_added_keeping_the_client_bytes() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let out = inject(body).unwrap();
        assert_eq!(
            &out[..],
            br#"{"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}],"stream":true}"#
        );
        assert_eq!(
            &inject(b" { } ").unwrap()[..],
            br#" {"stream_options":{"include_usage":true} } "#
        );
        // Existing options are kept; an explicit `false` is overridden (and filtered).
        let out =
            inject(br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        // The client asked already: nothing to do.
        assert!(inject(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).is_none());
        assert!(inject(b"[1,2]").is_none());
        assert!(inject(b"not json").is_none());
    }

    #[test]
    fn only_api_versions_that_accept_the_option() {
        for v in [
            "2024-09-01-preview",
            "2024-10-21",
            "2025-04-01-preview",
            "2024-10-01-preview",
        ] {
            assert!(accepts_stream_options(v), "{v}");
        }
        for v in [
            "2024-08-01-preview",
            "2024-06-01",
            "2023-05-15",
            "preview",
            "",
            "2024-9-01",
            "v1",
        ] {
            assert!(!accepts_stream_options(v), "{v}");
        }
    }
}
