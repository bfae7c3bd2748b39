//! Clients that do not read their response: one that stops reading a stream altogether, one
//! that reads it a trickle at a time. Neither may hold its request (its concurrency slot, its
//! `end` record) for longer than the limits say, and either way the whole answer AOAI sent,
//! usage included, is recorded.
#![expect(clippy::expect_used, reason = "tests fail loudly")]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Answers of 4,000 words, each token its own event: with four choices, a stream large enough
/// to fill every buffer between the proxy and a client that does not read.
fn big_stream_sim(sim: &mut tollgate_aoai_sim::SimConfig) {
    sim.min_completion_tokens = 4_000;
    sim.max_completion_tokens = 4_000;
}

fn big_stream_request(choices: u32) -> Vec<u8> {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "a long answer, please"}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "n": choices,
    });
    let body = serde_json::to_vec(&body).expect("json");
    raw_request(
        "POST",
        &format!("/openai/deployments/gpt-4o/chat/completions?{API}"),
        &[("api-key", KEY), ("content-type", "application/json")],
        &body,
    )
}

/// Reads up to the end of the response head (and whatever of the body came with it); returns
/// the request id.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let prefix = format!("{}: ", tollgate_logging_proxy::REQUEST_ID_HEADER);
            return head
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .expect("request id header")
                .trim()
                .to_owned();
        }
        let n = stream.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The whole stream is in the records: every choice's events, the usage frame, `[DONE]`.
fn assert_whole_answer_recorded(segments: &str, choices: u64) {
    assert!(
        segments.trim_end().ends_with("data: [DONE]"),
        "the stream was recorded to its end"
    );
    let usage = segments
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage frame");
    // At least a token a word, 4,000 words a choice.
    let tokens = usage["completion_tokens"]
        .as_u64()
        .expect("completion tokens");
    assert!(tokens >= 4_000 * choices, "{usage}");
}

/// Review finding: a client that stopped reading a stream held its request for as long as it
/// kept the socket open — the tee is polled only when the connection can write, so neither its
/// timeouts nor its `end` record ever ran. Now a write blocked for `client_write_timeout_ms`
/// closes the connection and the rest of the answer is drained and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_answer_recorded() {
    let stack = Stack::start_with_sim(big_stream_sim, |c| {
        c.limits.client_write_timeout_ms = 300;
    })
    .await;
    let mut client = stack.connect_small_window().await;
    client
        .write_all(&big_stream_request(4))
        .await
        .expect("send");
    let id = within("the response head", read_head(&mut client)).await;
    // The client reads nothing more, and keeps its socket open to the end of the test.

    // `flush` returns once every request in flight has handed over its `end`.
    stack.flush().await;
    assert_eq!(stack.proxy.recorder().in_flight(), 0);
    let records = stack.records(&id).await;
    let end = end_of(&records);
    assert_eq!(end.status, 200);
    assert!(end.client_disconnected, "the client did not get it all");
    assert!(!end.truncated, "the drain read the answer to its end");
    assert_whole_answer_recorded(&segments_text(&records), 4);
    drop(client);
}

/// `total_timeout_ms` bounds how long a request is held, whoever is slow: a response still
/// going at it is cut off, and the rest of AOAI's answer is drained and recorded with its
/// usage. Here the client reads a trickle and AOAI sends an event a millisecond, so the
/// answer takes seconds, past the one-second limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_past_the_total_timeout_is_cut_off_and_drained() {
    let stack = Stack::start_with_sim(
        |sim| {
            big_stream_sim(sim);
            sim.inter_token_ms = 1;
        },
        |c| c.limits.total_timeout_ms = 1_000,
    )
    .await;
    let mut client = stack.connect_small_window().await;
    client
        .write_all(&big_stream_request(1))
        .await
        .expect("send");
    let id = within("the response head", read_head(&mut client)).await;
    // Half a kilobyte every 10 ms: a client slower than the answer.
    let trickle = async {
        let mut chunk = [0u8; 512];
        let mut read = 0usize;
        loop {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return read,
                Ok(n) => read += n,
            }
            // Pacing the client, not synchronisation: the proxy's deadline decides.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let read = within("the proxy to cut the client off", trickle).await;
    stack.flush().await;
    let records = stack.records(&id).await;
    let end = end_of(&records);
    assert!(
        (read as u64) < end.response_bytes,
        "the client was cut off before the end ({read} of {} bytes)",
        end.response_bytes
    );
    assert!(end.client_disconnected);
    let error = end.error.as_ref().expect("the cut is recorded");
    assert_eq!(error.code, "TotalTimeout");
    assert!(!end.truncated, "the drain read the answer to its end");
    assert_whole_answer_recorded(&segments_text(&records), 1);
}
