//! Hostile clients against the proxy alone (simulator behind it, embedded store under it): the
//! contract of `[proxy.limits]`, of canonical paths and of refusals, checked on the answers and
//! on the raw records through the change feed. Requests an HTTP library would fix or refuse go
//! over raw TCP.
#![expect(clippy::expect_used, reason = "tests fail loudly")]

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tollgate_logging_proxy::REQUEST_ID_HEADER;
use tollgate_records::{Body, RawRecord};

use crate::support::{
    API, KEY, PATIENCE, RawResponse, Stack, assert_one_end_each, end_of, raw_request,
    read_response, read_until_closed, request_of, segments_text, within,
};

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions";

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "Describe the sea"}]})
}

fn stream_body() -> Value {
    json!({
        "messages": [{"role": "user", "content": "Describe the sea"}],
        "stream": true,
        "stream_options": {"include_usage": true}
    })
}

/// The request id of an answer; every answer Tollgate gives must carry one.
fn rid(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(REQUEST_ID_HEADER)
        .unwrap_or_else(|| panic!("no {REQUEST_ID_HEADER} on a {} answer", resp.status()))
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// A chat body of exactly `len` bytes (padded in `user`, which the simulator ignores).
fn chat_body_of_len(len: usize) -> Vec<u8> {
    let head = r#"{"messages":[{"role":"user","content":"hi"}],"user":""#;
    let tail = r#""}"#;
    let pad = len - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Contract 1: every non-canonical spelling of an `/openai/` path is a 400 `InvalidPath` with
/// a request id, key or no key, and nothing reaches the backend; other paths are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_paths_get_400_and_never_reach_the_backend() {
    let s = Stack::start(|_| {}).await;
    let body = chat_body().to_string();
    let bad = [
        "/openai/deployments/gpt-4o//chat/completions",
        "/openai//deployments/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o/chat/completions/",
        "/openai/deployments/gpt-4o/./chat/completions",
        "/openai/deployments/gpt-4o/../gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o/../../other/chat/completions",
        "/openai/deployments/gpt-4o/%2e%2e/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o/%2E%2E/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o/.%2e/gpt-4o/chat/completions",
        "/openai/deployments/gpt-4o%2fchat/completions",
        "/openai/deployments/gpt-4o%2Fchat/completions",
        "/openai/deployments/gpt-4o/%5c..%5cother/chat/completions",
        "/openai/deployments/gpt-4o/..\\..\\other/chat/completions",
        "/openai/deployments/gpt-4o\\chat/completions",
        "/openai/deployments/gpt%2D4o/chat/completions",
        "/openai/deployments/gpt-4o%00/chat/completions",
        "/openai/deployments/gpt-4o%/chat/completions",
        "/openai/deployments/gpt-4o%zz/chat/completions",
        "/openai/deployments/gpt-4o/%252e%252e/x/chat/completions",
        "/openai/deployments/gpt-4o/%c0%ae%c0%ae/x/chat/completions",
        "/openai/deployments/gpt-4o/chat/completions%3Fapi-version=1",
        "/openai/deployments/gpt-4o;x=1/chat/completions",
        "/openai/deployments/gpt-4o@evil/chat/completions",
        "/openai/deployments/gpt-4o!/chat/completions",
        "/openai/deployments/gpt-4o$/chat/completions",
        "/openai/deployments/gpt-4o'/chat/completions",
        "/openai/deployments/gpt-4o(1)/chat/completions",
        "/openai/deployments/gpt-4o*/chat/completions",
        "/openai/deployments/gpt-4o+/chat/completions",
        "/openai/deployments/gpt-4o,/chat/completions",
        "/openai/deployments/gpt-4o=/chat/completions",
        "/openai/deployments/gpt-4o|/chat/completions",
        "/openai/deployments/gpt-4o{}/chat/completions",
        "/openai/deployments/gpt-4o^/chat/completions",
        "/openai/..",
        "/openai/.",
        "/openai/",
    ];
    // Every spelling is tried before asserting, so a failure lists all the broken ones.
    let mut broken = Vec::new();
    for path in bad {
        let target = format!("{path}?{API}");
        for key in [Some(KEY), None] {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(k) = key {
                headers.push(("api-key", k));
            }
            let resp = s
                .raw(&raw_request("POST", &target, &headers, body.as_bytes()))
                .await;
            let code = serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            if resp.status != 400
                || code.as_deref() != Some("InvalidPath")
                || resp.header(REQUEST_ID_HEADER).is_none()
            {
                broken.push(format!(
                    "{path} (key: {}): status {}, code {code:?}, request id {:?}",
                    key.is_some(),
                    resp.status,
                    resp.header(REQUEST_ID_HEADER)
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "not answered 400 InvalidPath with a request id:\n{}",
        broken.join("\n")
    );
    for path in [
        "/",
        "/openai",
        "/v1/chat/completions",
        "/OPENAI/deployments/gpt-4o/chat/completions",
        "/%6Fpenai/deployments/gpt-4o/chat/completions",
        "/deployments/gpt-4o/chat/completions",
    ] {
        let target = format!("{path}?{API}");
        let headers = [("content-type", "application/json"), ("api-key", KEY)];
        let resp = s
            .raw(&raw_request("POST", &target, &headers, body.as_bytes()))
            .await;
        assert_eq!(resp.status, 404, "{path}: {resp:?}");
        assert!(resp.header(REQUEST_ID_HEADER).is_some(), "{path}: {resp:?}");
    }
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 0, "nothing reached the backend");
    let (records, dead) = s.feed().await;
    assert!(dead.is_empty());
    assert_one_end_each(&records);
}

/// Contract 1, below the proxy: request targets hyper's parser refuses (before any of
/// Tollgate's code runs, so without its JSON body or a request id) are still a 400 and never
/// reach the backend. Characters hyper lets through are covered by the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_the_http_parser_refuses_never_reach_the_backend() {
    let s = Stack::start(|_| {}).await;
    let body = chat_body().to_string();
    for path in [
        "/openai/deployments/gpt-4o`/chat/completions",
        "/openai/deployments/gpt-4o\"/chat/completions",
        "/openai/deployments/gpt-4o</chat/completions",
        "/openai/deployments/gpt-4o>/chat/completions",
        "/openai/deployments/gpt-4o\u{7f}/chat/completions",
        "/openai/deployments/gpt-4o\u{e9}/chat/completions",
    ] {
        let target = format!("{path}?{API}");
        let headers = [("content-type", "application/json"), ("api-key", KEY)];
        let resp = s
            .raw(&raw_request("POST", &target, &headers, body.as_bytes()))
            .await;
        assert_eq!(resp.status, 400, "{path:?}: {resp:?}");
        if resp.header(REQUEST_ID_HEADER).is_some() {
            assert_eq!(resp.code(), "InvalidPath", "{path:?}");
        }
    }
    // More header fields than the HTTP parser takes (each tiny, far under max_header_bytes).
    let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    headers.push(("api-key", KEY));
    let resp = s
        .raw(&raw_request(
            "POST",
            &format!("{CHAT}?{API}"),
            &headers,
            body.as_bytes(),
        ))
        .await;
    assert!(resp.status == 431 || resp.status == 400, "{resp:?}");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 0, "nothing reached the backend");
}

/// Contract 2: the header-size limit applies before authentication (431 with or without a
/// key), a request without a valid key is a 401, and a refusal keeps only a bounded summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_before_the_key_and_refusals_keep_a_bounded_summary() {
    let s = Stack::start(|c| c.limits.max_header_bytes = 16 * 1024).await;
    let body = chat_body().to_string();
    let target = format!("{CHAT}?{API}");
    let value_300 = "v".repeat(300);
    let value_1000 = "w".repeat(1000);
    // 30 headers of 300 bytes: within the 16 KiB limit.
    let many: Vec<(String, &str)> = (0..30)
        .map(|i| (format!("x-pad-{i:02}"), value_300.as_str()))
        .collect();
    // 30 headers of 1000 bytes: over it.
    let huge: Vec<(String, &str)> = (0..30)
        .map(|i| (format!("x-big-{i:02}"), value_1000.as_str()))
        .collect();
    let with = |extra: &[(String, &str)], key: Option<&str>| {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        if let Some(k) = key {
            headers.push(("api-key", k));
        }
        headers.extend(extra.iter().map(|(k, v)| (k.as_str(), *v)));
        raw_request("POST", &target, &headers, body.as_bytes())
    };

    let over_no_key = s.raw(&with(&huge, None)).await;
    assert_eq!(over_no_key.status, 431, "{over_no_key:?}");
    assert_eq!(over_no_key.code(), "RequestHeadersTooLarge");
    let over_with_key = s.raw(&with(&huge, Some(KEY))).await;
    assert_eq!(over_with_key.status, 431, "{over_with_key:?}");
    assert_eq!(over_with_key.code(), "RequestHeadersTooLarge");
    let no_key = s.raw(&with(&many, None)).await;
    assert_eq!(no_key.status, 401, "{no_key:?}");
    let wrong_key = s.raw(&with(&many, Some("not-the-key"))).await;
    assert_eq!(wrong_key.status, 401, "{wrong_key:?}");
    let ok = s.raw(&with(&many, Some(KEY))).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 1, "only the authenticated request");

    for (resp, status) in [
        (&over_no_key, 431),
        (&over_with_key, 431),
        (&no_key, 401),
        (&wrong_key, 401),
    ] {
        let records = s.records(&resp.request_id()).await;
        let request = request_of(&records);
        assert!(
            request.headers.len() <= 17,
            "{status}: {} header entries kept",
            request.headers.len()
        );
        for (name, value) in &request.headers {
            assert!(
                value.len() <= 260,
                "{status}: {name} keeps {} bytes",
                value.len()
            );
            assert!(
                !value.contains("not-the-key"),
                "a presented key is never kept"
            );
        }
        assert_eq!(request.body, Body::Empty, "{status}: no body kept");
        assert_eq!(request.consumer.id, "anonymous");
        assert_eq!(end_of(&records).status, status);
    }
    let (records, _) = s.feed().await;
    assert_one_end_each(&records);
}

/// Contract 2: refusals are recorded only while the spool is empty, so a caller without a key
/// cannot fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_not_recorded_while_the_spool_holds_records() {
    let s = Stack::start(|_| {}).await;
    s.flaky.failing.store(true, Ordering::SeqCst);
    let resp = s.chat(&chat_body()).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let accepted = rid(&resp);
    resp.bytes().await.expect("body");
    // The store refuses: the accepted request's records are now in the spool.
    s.flush().await;
    assert!(
        s.proxy.recorder().spooled_bytes() > 0,
        "records were spooled"
    );

    let refused = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", "wrong")
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 401);
    let refused = rid(&refused);
    assert_eq!(
        s.proxy.stats().refusals_unrecorded.load(Ordering::Relaxed),
        1,
        "the refusal was counted, not recorded"
    );

    s.flaky.failing.store(false, Ordering::SeqCst);
    // A flush replays the spool into the recovered store.
    s.flush().await;
    let records = s.records(&accepted).await;
    assert_eq!(
        end_of(&records).status,
        200,
        "the accepted request survived the outage"
    );
    assert!(
        s.records(&refused).await.is_empty(),
        "the refusal made while spooling left no record"
    );
}

/// Contract 3: a client that sends part of its headers and stalls, or trickles them, loses its
/// connection after `header_read_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_or_trickles_its_headers_is_disconnected() {
    let s = Stack::start(|c| c.limits.header_read_timeout_ms = 300).await;

    let mut stalled = s.connect().await;
    stalled
        .write_all(
            format!("POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\n").as_bytes(),
        )
        .await
        .expect("write part of the headers");
    let answered = within(
        "the stalled connection to close",
        read_until_closed(&mut stalled),
    )
    .await;
    // hyper may say 408 before closing; nothing else is allowed.
    let text = String::from_utf8_lossy(&answered);
    assert!(
        answered.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // One byte at a time: the timeout bounds the whole head, not the gap between bytes.
    let mut trickle = s.connect().await;
    let head = format!("POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\nx-slow: ");
    // At most 400 bytes (8 s at the client's pace): far more than 300 ms lets through.
    const MAX_TRICKLE: usize = 400;
    let sent = within("the trickling connection to close", async {
        let mut sent = 0usize;
        for b in head
            .bytes()
            .chain(std::iter::repeat(b'a'))
            .take(MAX_TRICKLE)
        {
            if trickle.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
            // The client's pace, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    })
    .await;
    assert!(
        sent < MAX_TRICKLE,
        "the trickling connection was still open after {sent} bytes"
    );
    let rest = within(
        "the trickling connection's EOF",
        read_until_closed(&mut trickle),
    )
    .await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // Nothing at all sent: the connection is not held for ever either.
    let mut silent = s.connect().await;
    let rest = within(
        "the silent connection to close",
        read_until_closed(&mut silent),
    )
    .await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 0);
}

/// Contract 4: a body that stalls gets 408 `RequestTimeout`, recorded with exactly one `end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_body_gets_408_and_one_end_record() {
    let s = Stack::start(|c| c.limits.body_read_timeout_ms = 300).await;
    let mut conn = s.connect().await;
    let head = format!(
        "POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"messages\":"
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let resp = within("the 408", read_response(&mut conn))
        .await
        .expect("a response");
    assert_eq!(resp.status, 408, "{resp:?}");
    assert_eq!(resp.code(), "RequestTimeout");
    let id = resp.request_id();
    drop(conn);
    s.flush().await;
    let records = s.records(&id).await;
    request_of(&records);
    assert_eq!(end_of(&records).status, 408);
    assert_eq!(s.sim.total_requests(), 0);
    let (records, _) = s.feed().await;
    assert_one_end_each(&records);
}

/// Contract 4: the body timeout bounds the whole body, so a body trickled a byte at a time
/// also gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_body_gets_408() {
    let s = Stack::start(|c| c.limits.body_read_timeout_ms = 300).await;
    let mut conn = s.connect().await;
    let head = format!(
        "POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let (mut read, mut write) = conn.into_split();
    let trickle = async {
        // The client's own pace, not a synchronisation: a byte every 20 ms, 1000 bytes would
        // take 20 s.
        for _ in 0..1000 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let answer = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut read, &mut chunk)
                .await
                .unwrap_or(0);
            if n == 0 {
                return buf;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"}") {
                return buf;
            }
        }
    };
    let got = within("the 408", async {
        tokio::select! {
            got = answer => got,
            () = trickle => Vec::new(),
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("RequestTimeout"), "{text}");
    s.flush().await;
    let (records, _) = s.feed().await;
    assert_one_end_each(&records);
    let ends: Vec<u16> = records
        .iter()
        .filter_map(|r| match r {
            RawRecord::End(e) => Some(e.status),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [408]);
}

/// Contract 8 without a `content-length`: a chunked body is held to the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_held_to_the_same_limit() {
    const LIMIT: usize = 4096;
    let s = Stack::start(|c| c.limits.max_request_body_bytes = LIMIT).await;
    let chunked = |body: &[u8]| {
        let mut out = format!(
            "POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        .into_bytes();
        for piece in body.chunks(1000) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    };
    let at = s.raw(&chunked(&chat_body_of_len(LIMIT))).await;
    assert_eq!(at.status, 200, "{at:?}");
    let over = s.raw(&chunked(&chat_body_of_len(LIMIT + 1))).await;
    assert_eq!(over.status, 413, "{over:?}");
    assert_eq!(over.code(), "RequestEntityTooLarge");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 1);
    let records = s.records(&over.request_id()).await;
    request_of(&records);
    assert_eq!(end_of(&records).status, 413);
}

/// Contract 11 (and 4's neighbour): a client admitted with a body still to come that hangs up
/// mid-body was accepted, so its request ends with exactly one `end` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_body_still_gets_one_end_record() {
    let s = Stack::start(|c| c.limits.body_read_timeout_ms = 30_000).await;
    let mut conn = s.connect().await;
    let head = format!(
        "POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"messages\":"
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    // Admitted: the recorder counts it in flight (bounded wait, no fixed sleep).
    within("the request to be admitted", async {
        while s.proxy.recorder().in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(conn);
    s.flush().await;
    let (records, dead) = s.feed().await;
    assert!(dead.is_empty());
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, RawRecord::Request(_)))
            .count(),
        1,
        "the accepted request was recorded: {records:#?}"
    );
    assert_one_end_each(&records);
    let end = end_of(&records);
    assert!(
        end.client_disconnected,
        "the end says the client left: {end:?}"
    );
    assert_eq!(
        end.error.as_ref().map(|e| e.code.as_str()),
        Some("ClientClosedRequest")
    );
    assert_eq!(s.sim.total_requests(), 0);
}

/// Opens `cap + extra` idle connections against a cap of `cap`: the `extra` are closed at once,
/// the `cap` first stay usable, and the refusals are counted.
async fn connection_cap_holds(s: &Stack, cap: usize, extra: usize) {
    let mut conns = Vec::new();
    // One after the other: the proxy accepts them in this order.
    for _ in 0..cap + extra {
        conns.push(s.connect().await);
    }
    let mut over = conns.split_off(cap);
    for conn in &mut over {
        let seen = within(
            "a connection over the cap to close",
            read_until_closed(conn),
        )
        .await;
        assert!(seen.is_empty(), "closed without an answer");
    }
    assert_eq!(
        s.proxy.stats().connections_refused.load(Ordering::Relaxed),
        extra as u64
    );
    let body = chat_body().to_string();
    let request = raw_request(
        "POST",
        &format!("{CHAT}?{API}"),
        &[("api-key", KEY), ("content-type", "application/json")],
        body.as_bytes(),
    );
    for conn in &mut conns {
        conn.write_all(&request)
            .await
            .expect("write on a kept connection");
        let resp = within("an answer on a kept connection", read_response(conn))
            .await
            .expect("answer");
        assert_eq!(resp.status, 200, "{resp:?}");
        assert!(resp.json()["usage"]["total_tokens"].is_u64());
    }
    // Closing one frees its place: a new connection is served again (the close is noticed by
    // the server asynchronously, so the new one may be refused a bounded number of times).
    drop(conns.pop());
    let mut served = false;
    for _ in 0..200 {
        let mut conn = s.connect().await;
        if conn.write_all(&request).await.is_err() {
            continue;
        }
        if let Ok(Ok(resp)) = tokio::time::timeout(PATIENCE, read_response(&mut conn)).await {
            assert_eq!(resp.status, 200);
            served = true;
            break;
        }
    }
    assert!(served, "a freed place is given to a new connection");
    s.flush().await;
}

/// Contract 5, per IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_are_closed_and_the_rest_stay_usable() {
    let s = Stack::start(|c| {
        c.limits.max_connections_per_ip = 3;
        c.limits.header_read_timeout_ms = 60_000;
    })
    .await;
    connection_cap_holds(&s, 3, 2).await;
}

/// Contract 5, in total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_cap_are_closed_and_the_rest_stay_usable() {
    let s = Stack::start(|c| {
        c.limits.max_connections = 4;
        c.limits.header_read_timeout_ms = 60_000;
    })
    .await;
    connection_cap_holds(&s, 4, 3).await;
}

/// Contract 6: with two slow requests holding both slots, a third is shed with 503
/// `ServerBusy` and `retry-after`; the two complete normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_concurrency_limit_is_shed_and_the_others_complete() {
    let s = Stack::start(|c| c.limits.max_concurrent_requests = 2).await;
    let slow = || async {
        let resp = s
            .chat(&chat_body())
            .header("x-sim-fault", "slow-first-byte=1500")
            .send()
            .await
            .expect("send");
        let status = resp.status();
        rid(&resp);
        let body: Value = resp.json().await.expect("json");
        (status, body)
    };
    let third = async {
        s.sim_received(2).await;
        let resp = s.chat(&chat_body()).send().await.expect("send");
        let status = resp.status();
        let retry_after = resp.headers().get("retry-after").cloned();
        rid(&resp);
        let body: Value = resp.json().await.expect("json");
        (status, retry_after, body)
    };
    let ((a, a_body), (b, b_body), (c, retry_after, c_body)) =
        within("the three requests", async {
            tokio::join!(slow(), slow(), third)
        })
        .await;
    assert_eq!(c, 503, "{c_body}");
    assert_eq!(c_body["error"]["code"], "ServerBusy");
    assert!(retry_after.is_some(), "503 carries retry-after");
    assert_eq!((a.as_u16(), b.as_u16()), (200, 200));
    assert!(a_body["usage"]["total_tokens"].is_u64());
    assert!(b_body["usage"]["total_tokens"].is_u64());
    assert_eq!(s.proxy.stats().shed.load(Ordering::Relaxed), 1);
    s.flush().await;
    assert_eq!(
        s.sim.total_requests(),
        2,
        "the shed request was not forwarded"
    );
    // Slots come back once the requests ended.
    let resp = s.chat(&chat_body()).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    s.flush().await;
    let (records, _) = s.feed().await;
    assert_one_end_each(&records);
}

/// Sends `body` raw with `slow-first-byte=300`, waits until the simulator has it, and leaves.
async fn leave_before_the_headers(s: &Stack, body: &Value) -> Vec<RawRecord> {
    let mut conn = s.connect().await;
    let body = body.to_string();
    let request = raw_request(
        "POST",
        &format!("{CHAT}?{API}"),
        &[
            ("api-key", KEY),
            ("content-type", "application/json"),
            ("x-sim-fault", "slow-first-byte=300"),
        ],
        body.as_bytes(),
    );
    conn.write_all(&request).await.expect("write request");
    s.sim_received(1).await;
    drop(conn);
    // Waits for the exchange whose client left, too.
    s.flush().await;
    let (records, dead) = s.feed().await;
    assert!(dead.is_empty());
    assert_one_end_each(&records);
    let id = request_of(&records).request_id.clone();
    s.records(&id).await
}

/// Contract 7, non-stream: recorded with AOAI's body (and its usage) inline in the `end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_client_gone_before_the_headers_is_recorded_with_usage() {
    let s = Stack::start(|_| {}).await;
    let records = leave_before_the_headers(&s, &chat_body()).await;
    let end = end_of(&records);
    assert_eq!(end.status, 200);
    assert!(end.client_disconnected, "{end:#?}");
    let body = end
        .body
        .parse_json()
        .expect("the JSON body is inline in the end record");
    assert!(body["usage"]["total_tokens"].is_u64(), "{body}");
    assert!(body["usage"]["prompt_tokens"].is_u64(), "{body}");
}

/// Contract 7, stream: the segments hold the usage frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_client_gone_before_the_headers_is_recorded_with_the_usage_frame() {
    let s = Stack::start(|_| {}).await;
    let records = leave_before_the_headers(&s, &stream_body()).await;
    let end = end_of(&records);
    assert_eq!(end.status, 200);
    assert!(end.client_disconnected, "{end:#?}");
    assert!(end.segments > 0, "{end:#?}");
    let text = segments_text(&records);
    let usage = text
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|f| f["usage"].is_object());
    let usage = usage.unwrap_or_else(|| panic!("no usage frame in the segments:\n{text}"));
    assert!(usage["usage"]["total_tokens"].is_u64());
    assert!(
        text.contains("data: [DONE]"),
        "the stream was read to its end"
    );
}

/// Contract 8: a body of exactly `max_request_body_bytes` is forwarded; one byte more is a 413,
/// recorded (request + end 413) and not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_exactly_the_limit_passes_and_one_byte_more_gets_413() {
    const LIMIT: usize = 4096;
    let s = Stack::start(|c| c.limits.max_request_body_bytes = LIMIT).await;
    let send = |len: usize| {
        s.http
            .post(s.chat_url("gpt-4o"))
            .header("api-key", KEY)
            .header("content-type", "application/json")
            .body(chat_body_of_len(len))
            .send()
    };
    let at = send(LIMIT).await.expect("send");
    assert_eq!(at.status(), 200);
    let at_id = rid(&at);
    at.bytes().await.expect("body");
    s.flush().await;
    assert_eq!(
        s.sim.requests_to("gpt-4o"),
        1,
        "the body at the limit was forwarded"
    );

    let over = send(LIMIT + 1).await.expect("send");
    assert_eq!(over.status(), 413);
    let over_id = rid(&over);
    let e: Value = over.json().await.expect("json");
    assert_eq!(e["error"]["code"], "RequestEntityTooLarge");
    s.flush().await;
    assert_eq!(
        s.sim.total_requests(),
        1,
        "the body over the limit was not forwarded"
    );

    let records = s.records(&at_id).await;
    match &request_of(&records).body {
        Body::Json { json } => assert_eq!(json.as_str().len(), LIMIT),
        other => panic!("recorded as {other:?}"),
    }
    assert_eq!(end_of(&records).status, 200);
    let records = s.records(&over_id).await;
    request_of(&records);
    assert_eq!(end_of(&records).status, 413);
    let (records, _) = s.feed().await;
    assert_one_end_each(&records);
}

/// Contract 8: bytes that are not UTF-8 under `application/json` are forwarded and recorded as
/// base64; JSON under `text/plain` is recorded as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_recorded_as_what_they_are() {
    let s = Stack::start(|_| {}).await;
    let binary: Vec<u8> = b"{\"messages\": \"\xff\xfe\x00\x80\"}".to_vec();
    let resp = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", KEY)
        .header("content-type", "application/json")
        .body(binary.clone())
        .send()
        .await
        .expect("send");
    let binary_id = rid(&resp);
    resp.bytes().await.expect("body");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 1, "forwarded");

    let text = chat_body().to_string();
    let resp = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", KEY)
        .header("content-type", "text/plain")
        .body(text.clone())
        .send()
        .await
        .expect("send");
    let text_id = rid(&resp);
    resp.bytes().await.expect("body");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 2, "forwarded");

    let records = s.records(&binary_id).await;
    let body = &request_of(&records).body;
    assert_eq!(
        serde_json::to_value(body).expect("serialise")["encoding"],
        "base64"
    );
    match body {
        Body::Base64 { data, .. } => {
            use base64::Engine as _;
            let back = base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64");
            assert_eq!(back, binary, "recorded byte for byte");
        }
        other => panic!("recorded as {other:?}"),
    }
    end_of(&records);

    let records = s.records(&text_id).await;
    match &request_of(&records).body {
        Body::Text {
            content_type,
            text: recorded,
        } => {
            assert_eq!(recorded, &text);
            assert!(content_type.starts_with("text/plain"));
        }
        other => panic!("recorded as {other:?}"),
    }
    end_of(&records);
}

/// Contract 8: valid JSON nested 200 deep is forwarded and recorded as text, and the change
/// feed reads on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_200_deep_is_recorded_as_text_and_the_feed_reads_on() {
    let s = Stack::start(|_| {}).await;
    let deep = format!(
        r#"{{"messages":[{{"role":"user","content":"hi"}}],"user":"u","metadata":{}}}"#,
        nested(200)
    );
    let resp = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", KEY)
        .header("content-type", "application/json")
        .body(deep.clone())
        .send()
        .await
        .expect("send");
    let deep_id = rid(&resp);
    resp.bytes().await.expect("body");
    // A stream and a plain request after it.
    let resp = s.chat(&stream_body()).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let stream_id = rid(&resp);
    resp.bytes().await.expect("body");
    let resp = s.chat(&chat_body()).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let later_id = rid(&resp);
    resp.bytes().await.expect("body");
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 3, "the deep body was forwarded");

    let (records, dead) = s.feed().await;
    assert!(dead.is_empty(), "every document reads back: {dead:?}");
    assert_one_end_each(&records);
    for id in [&deep_id, &stream_id, &later_id] {
        assert!(
            records
                .iter()
                .any(|r| r.request_id() == id.as_str() && matches!(r, RawRecord::End(_))),
            "the feed reads {id}'s end"
        );
    }
    let deep_records = s.records(&deep_id).await;
    let body = &request_of(&deep_records).body;
    assert_eq!(
        serde_json::to_value(body).expect("serialise")["encoding"],
        "text"
    );
    match body {
        Body::Text { text, .. } => assert_eq!(text, &deep, "kept verbatim"),
        other => panic!("recorded as {other:?}"),
    }
}

/// Contract 9: a model-bound v1 call whose body has no readable `model` is a 400
/// `MissingModel`, recorded, and never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_call_without_a_readable_model_gets_400_and_is_not_forwarded() {
    let s = Stack::start(|_| {}).await;
    let cases: [(&str, &str, &[u8]); 6] = [
        (
            "chat/completions",
            "application/json",
            br#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "chat/completions",
            "application/json",
            br#"{"model":5,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "chat/completions",
            "application/json",
            br#"{"model":null,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        ("chat/completions", "application/json", b""),
        (
            "chat/completions",
            "application/x-www-form-urlencoded",
            b"model=gpt-4o",
        ),
        ("embeddings", "application/json", br#"{"input":"hi"}"#),
    ];
    let mut ids = Vec::new();
    for (op, content_type, body) in cases {
        let resp = s
            .raw(&raw_request(
                "POST",
                &format!("/openai/v1/{op}"),
                &[("api-key", KEY), ("content-type", content_type)],
                body,
            ))
            .await;
        assert_eq!(
            resp.status,
            400,
            "{op} {:?}: {resp:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(resp.code(), "MissingModel");
        ids.push(resp.request_id());
    }
    s.flush().await;
    assert_eq!(s.sim.total_requests(), 0, "nothing was forwarded");
    for id in ids {
        let records = s.records(&id).await;
        request_of(&records);
        assert_eq!(end_of(&records).status, 400);
    }
    // With a model it goes through.
    let resp = s
        .http
        .post(s.url("/openai/v1/chat/completions"))
        .header("api-key", KEY)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    rid(&resp);
    resp.bytes().await.expect("body");
    s.flush().await;
    assert_eq!(s.sim.requests_to("gpt-4o"), 1);
}

/// Contract 10: credentials in the query are recorded redacted, accepted or refused, and the
/// secret is in no raw record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_credentials_are_redacted_in_every_record() {
    const SECRET: &str = "s3cr3t-in-the-query-7731";
    let s = Stack::start(|_| {}).await;
    let query = format!("api-version=2024-10-21&api-key={SECRET}");
    let accepted = s
        .http
        .post(s.url(&format!("{CHAT}?{query}")))
        .header("api-key", KEY)
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    assert_eq!(accepted.status(), 200);
    let accepted_id = rid(&accepted);
    accepted.bytes().await.expect("body");
    let refused = s
        .http
        .post(s.url(&format!("{CHAT}?{query}")))
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status(), 401);
    let refused_id = rid(&refused);
    let bad_path = s
        .raw(&raw_request(
            "POST",
            &format!("/openai/deployments/gpt-4o/../x?{query}"),
            &[("api-key", KEY)],
            b"{}",
        ))
        .await;
    assert_eq!(bad_path.status, 400);
    let mixed_case = s
        .http
        .post(s.url(&format!("{CHAT}?api-version=2024-10-21&API-Key={SECRET}")))
        .header("api-key", KEY)
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    assert_eq!(mixed_case.status(), 200);
    let mixed_id = rid(&mixed_case);
    mixed_case.bytes().await.expect("body");
    s.flush().await;

    for id in [&accepted_id, &refused_id] {
        let records = s.records(id).await;
        assert_eq!(
            request_of(&records).query.as_deref(),
            Some("api-version=2024-10-21&api-key=[redacted]")
        );
    }
    let records = s.records(&mixed_id).await;
    assert_eq!(
        request_of(&records).query.as_deref(),
        Some("api-version=2024-10-21&API-Key=[redacted]")
    );
    let (records, _) = s.feed().await;
    assert!(records.len() >= 8);
    for r in &records {
        let text = serde_json::to_string(r).expect("serialise");
        assert!(!text.contains(SECRET), "the secret is in {text}");
    }
    assert_one_end_each(&records);
}

/// Contract 10, one spelling further: AOAI decodes query names, so `api%2Dkey` is the same
/// credential and must not be recorded in clear either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_query_credential_names_are_redacted_too() {
    const SECRET: &str = "s3cr3t-encoded-name-4410";
    let s = Stack::start(|_| {}).await;
    let resp = s
        .http
        .post(s.url(&format!("{CHAT}?api-version=2024-10-21&api%2Dkey={SECRET}")))
        .header("api-key", KEY)
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    rid(&resp);
    resp.bytes().await.expect("body");
    s.flush().await;
    let (records, _) = s.feed().await;
    assert!(!records.is_empty());
    for r in &records {
        let text = serde_json::to_string(r).expect("serialise");
        assert!(!text.contains(SECRET), "the secret is in {text}");
    }
}

/// Contract 11: a mix of every kind of answer — success, stream, AOAI's own errors, Tollgate's
/// refusals before and after admission — each carries a request id, and each recorded request
/// has exactly one `end` whose status is the one the client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_has_a_request_id_and_every_recorded_request_one_end() {
    let s = Stack::start(|c| {
        c.limits.max_request_body_bytes = 2048;
        c.limits.max_header_bytes = 4096;
    })
    .await;
    let mut seen: Vec<(String, u16)> = Vec::new();
    let mut check = |resp: &reqwest::Response| {
        seen.push((rid(resp), resp.status().as_u16()));
    };
    let plain = s.chat(&chat_body()).send().await.expect("send");
    check(&plain);
    plain.bytes().await.expect("body");
    let stream = s.chat(&stream_body()).send().await.expect("send");
    check(&stream);
    stream.bytes().await.expect("body");
    // A 429 rests its backend for its retry-after: 0 keeps the later requests on it.
    for fault in ["500", "503", "429;retry-after-ms=0", "content-filter"] {
        let resp = s
            .chat(&chat_body())
            .header("x-sim-fault", fault)
            .send()
            .await
            .expect("send");
        check(&resp);
        resp.bytes().await.expect("body");
    }
    // The stream cut by the backend after three frames still ends once.
    let cut = s
        .chat(&stream_body())
        .header("x-sim-fault", "reset-after-chunks=3")
        .send()
        .await
        .expect("send");
    check(&cut);
    let _ = cut.bytes().await;
    let unknown = s
        .http
        .post(s.chat_url("no-such-deployment"))
        .header("api-key", KEY)
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    check(&unknown);
    let too_big = s
        .http
        .post(s.chat_url("gpt-4o"))
        .header("api-key", KEY)
        .header("content-type", "application/json")
        .body(chat_body_of_len(2049))
        .send()
        .await
        .expect("send");
    check(&too_big);
    let no_key = s
        .http
        .post(s.chat_url("gpt-4o"))
        .json(&chat_body())
        .send()
        .await
        .expect("send");
    check(&no_key);
    let big_headers = s
        .chat(&chat_body())
        .header("x-big", "b".repeat(5000))
        .send()
        .await
        .expect("send");
    check(&big_headers);
    let raw: RawResponse = s
        .raw(&raw_request(
            "POST",
            "/openai/deployments/gpt-4o/%2e%2e/x",
            &[("api-key", KEY)],
            b"{}",
        ))
        .await;
    seen.push((raw.request_id(), raw.status));
    s.flush().await;

    let statuses: Vec<u16> = seen.iter().map(|(_, st)| *st).collect();
    assert_eq!(
        statuses,
        [200, 200, 500, 503, 429, 400, 200, 404, 413, 401, 431, 400],
        "the answers"
    );
    let (records, dead) = s.feed().await;
    assert!(dead.is_empty());
    assert_one_end_each(&records);
    for (id, status) in &seen {
        let mine: Vec<RawRecord> = records
            .iter()
            .filter(|r| r.request_id() == id.as_str())
            .cloned()
            .collect();
        assert_eq!(end_of(&mine).status, *status, "{id}");
    }
}
