//! `tollgate up` as a child process (bundled simulator, embedded store) under a mix of hostile
//! and ordinary clients, then the store read from the test: every request that got an answer
//! from the simulator, or a refusal Tollgate records, has exactly one consolidated record with
//! the status the client saw (and usage when it succeeded); the one whose client left before
//! the headers is there with its usage and cost; the feed is not stuck; and the process's peak
//! memory stayed bounded with bodies near the 1 MiB limit.
//!
//! Requests an HTTP client would fix or refuse go over raw TCP. Every wait is bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_records::{ConsolidatedRecord, UsageSource};

use crate::up::{Up, UpConfig, consolidated, open_store};

const KEY: &str = "hostile-pipeline-key";
const ADMIN_KEY: &str = "hostile-pipeline-admin-key";
const API: &str = "api-version=2024-10-21";
const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions";
/// `[proxy.limits] max_request_body_bytes` for this run.
const BODY_LIMIT: usize = 1024 * 1024;
/// Peak resident memory (`VmHWM`) `tollgate up` may reach over the whole run, in KiB. The idle
/// process (debug build, tokenizer tables and the simulator warmed up) is about 95 MiB; the run
/// has six bodies near the 1 MiB limit in flight at once, each costing a few copies (the bytes
/// read, the request record and its parts, the writer's batch, SQLite's pages, the parser's
/// reading of it), and peaked at about 140 MiB when this was written. 256 MiB leaves more than
/// twice the measured growth as headroom and still catches a body buffered per request
/// without bound or a leak across requests.
const PEAK_RSS_BOUND_KIB: u64 = 256 * 1024;
/// The outer safety net of every wait.
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// This run's `tollgate up`: tight limits, so the hostile clients meet them.
fn start_up(dir: &Path, data: &Path) -> Up {
    let sections = format!(
        "[proxy.limits]
max_request_body_bytes = {BODY_LIMIT}
max_header_bytes = 16384
header_read_timeout_ms = 1500
body_read_timeout_ms = 2000
[proxy.recorder]
max_body_part_bytes = 262144"
    );
    Up::start(
        dir,
        data,
        "tollgate",
        &UpConfig {
            env: &[],
            consumer: "hostile",
            key: KEY,
            admin_key: ADMIN_KEY,
            sections: &sections,
        },
    )
}

/// What a request must have become in the store.
#[derive(Debug)]
struct Expected {
    label: String,
    id: String,
    status: u16,
    usage: Option<UsageSource>,
    priced: bool,
    truncated: bool,
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Describe the sea"}])
}

fn chat_body() -> Value {
    json!({"messages": messages()})
}

fn stream_body(include_usage: bool) -> Value {
    let mut b = json!({"messages": messages(), "stream": true});
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// A chat body of exactly `len` bytes, padded in `user` (which the simulator ignores).
fn chat_body_of_len(len: usize, stream: bool) -> Vec<u8> {
    let head = if stream {
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"user":""#
    } else {
        r#"{"messages":[{"role":"user","content":"hi"}],"user":""#
    };
    let tail = r#""}"#;
    let body = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

struct Client {
    http: reqwest::Client,
    base: String,
    addr: SocketAddr,
}

/// An answer: request id (every answer must carry one), status, body.
struct Answer {
    id: String,
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Client {
    fn post(&self, path_and_query: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path_and_query}", self.base))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let resp = within("an answer", request.send()).await.expect("send");
        let status = resp.status().as_u16();
        let id = resp
            .headers()
            .get(tollgate_logging_proxy::REQUEST_ID_HEADER)
            .unwrap_or_else(|| panic!("no request id on a {status} answer"))
            .to_str()
            .expect("ascii")
            .to_owned();
        // A cut stream ends in an error: what arrived is enough.
        let body = within("a body", resp.bytes())
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        Answer { id, status, body }
    }

    async fn chat(&self, body: Value, headers: &[(&str, &str)]) -> Answer {
        let mut r = self
            .post(&format!("{CHAT}?{API}"))
            .header("api-key", KEY)
            .json(&body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        self.send(r).await
    }

    async fn bytes(&self, content_type: &str, body: Vec<u8>) -> Answer {
        self.send(
            self.post(&format!("{CHAT}?{API}"))
                .header("api-key", KEY)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    async fn connect(&self) -> TcpStream {
        within("a connection", TcpStream::connect(self.addr))
            .await
            .expect("connect")
    }

    /// A raw request (`connection: close`); the status, request id and body of the answer.
    async fn raw(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Option<String>, Value) {
        let mut conn = self.connect().await;
        conn.write_all(&raw_request(target, headers, body, true))
            .await
            .expect("write");
        let mut buf = Vec::new();
        within("a raw answer", conn.read_to_end(&mut buf))
            .await
            .expect("read");
        parse_response(&buf)
    }

    /// The admin metrics, by name.
    async fn metrics(&self) -> BTreeMap<String, f64> {
        let text = within(
            "metrics",
            self.http
                .get(format!("{}/tollgate/admin/metrics", self.base))
                .header("api-key", ADMIN_KEY)
                .send(),
        )
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect()
    }

    /// Waits until every request so far is recorded and consolidated.
    async fn flush(&self) {
        let resp = within(
            "the admin flush",
            self.http
                .post(format!("{}/tollgate/admin/flush", self.base))
                .header("api-key", ADMIN_KEY)
                .send(),
        )
        .await
        .expect("flush");
        assert_eq!(resp.status(), 200);
    }

    /// Sends a chat request raw, waits until the proxy has accepted it and handed its request
    /// record over (the exchange is then running without the client), and hangs up before
    /// AOAI's headers (`slow-first-byte`).
    async fn leave_before_the_headers(&self, body: &Value, user_agent: &str) {
        let before = self.metrics().await;
        let enqueued = |m: &BTreeMap<String, f64>| {
            m.get("tollgate_recorder_records_enqueued_total")
                .copied()
                .unwrap_or(0.0)
        };
        let mut conn = self.connect().await;
        let body = body.to_string();
        conn.write_all(&raw_request(
            &format!("{CHAT}?{API}"),
            &[
                ("api-key", KEY),
                ("content-type", "application/json"),
                ("user-agent", user_agent),
                ("x-sim-fault", "slow-first-byte=1500"),
            ],
            body.as_bytes(),
            false,
        ))
        .await
        .expect("write");
        within("the request to be under way", async {
            // Bounded by `within`; each look is an admin request, not a fixed sleep.
            loop {
                let m = self.metrics().await;
                let in_flight = m
                    .get("tollgate_proxy_requests_in_flight")
                    .copied()
                    .unwrap_or(0.0);
                if in_flight >= 1.0 && enqueued(&m) > enqueued(&before) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(conn);
    }
}

/// Checks the answer's status and notes what it must become in the store.
fn expect_answer(
    expected: &mut Vec<Expected>,
    label: &str,
    a: &Answer,
    status: u16,
    usage: Option<UsageSource>,
) {
    assert_eq!(
        a.status,
        status,
        "{label}: {:?}",
        String::from_utf8_lossy(&a.body)
    );
    expected.push(Expected {
        label: label.to_owned(),
        id: a.id.clone(),
        status,
        usage,
        priced: usage.is_some(),
        truncated: false,
    });
}

/// Reads one response sized by `content-length` (Tollgate's own answers are), head included.
async fn read_one_response(conn: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .expect("a sized answer");
            if body.len() >= len {
                return got;
            }
        }
        let n = conn.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before an answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

fn raw_request(target: &str, headers: &[(&str, &str)], body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!("POST {target} HTTP/1.1\r\nhost: tollgate.test\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// Status, request id and JSON body (`Null` when not JSON) of a response read to its end.
fn parse_response(buf: &[u8]) -> (u16, Option<String>, Value) {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let id = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| {
            k.trim()
                .eq_ignore_ascii_case(tollgate_logging_proxy::REQUEST_ID_HEADER)
        })
        .map(|(_, v)| v.trim().to_owned());
    (
        status,
        id,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_normal_clients_through_tollgate_up_are_each_consolidated_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let up = start_up(dir.path(), &data);
    let c = Client {
        // No pooled connections: the short header-read timeout closes idle ones.
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("client"),
        base: up.base(),
        addr: up.addr,
    };
    let mut expected: Vec<Expected> = Vec::new();
    let idle_kib = up.peak_rss_kib();
    use UsageSource::Reported;

    // Phase 1: everything at once.
    let cr = &c;
    let big = |n: usize| async move {
        let len = BODY_LIMIT - n * 1000;
        cr.bytes("application/json", chat_body_of_len(len, n % 2 == 1))
            .await
    };
    let stall_body = async {
        let mut conn = c.connect().await;
        conn.write_all(
            format!(
                "POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"messages\":"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        // The 408 arrives while the client still holds the connection open.
        let got = within("the 408", read_one_response(&mut conn)).await;
        parse_response(&got)
    };
    let traversal = format!("/openai/deployments/gpt-4o/%2e%2e/%2e%2e/x?{API}");
    let stall_headers = async {
        let mut conn = c.connect().await;
        conn.write_all(format!("POST {CHAT}?{API} HTTP/1.1\r\nhost: x\r\n").as_bytes())
            .await
            .expect("write");
        let mut rest = Vec::new();
        // Closed by the header-read timeout: EOF or a reset both end it.
        let _ = within(
            "the stalled connection to close",
            conn.read_to_end(&mut rest),
        )
        .await;
    };
    let (
        (plain1, plain2, mini, stream1, stream2, stream_no_usage),
        (e500, e429, filtered, cut),
        (big0, big1, big2, big3, big4, over),
        (deep, binary, text_plain, query_secret),
        ((stall_status, stall_id, stall_body_json), (), missing_model, unknown),
        (bad_path, no_key, big_headers, outside),
    ) = within(
        "phase 1",
        // Boxed: the joined requests make one large future.
        Box::pin(async {
            tokio::join!(
                async {
                    tokio::join!(
                        c.chat(chat_body(), &[]),
                        c.chat(json!({"messages": messages(), "max_tokens": 5}), &[]),
                        async {
                            c.send(
                                c.post(&format!(
                                    "/openai/deployments/gpt-4o-mini/chat/completions?{API}"
                                ))
                                .header("api-key", KEY)
                                .json(&chat_body()),
                            )
                            .await
                        },
                        c.chat(stream_body(true), &[]),
                        c.chat(stream_body(true), &[("x-sim-inter-token-ms", "2")]),
                        c.chat(stream_body(false), &[]),
                    )
                },
                async {
                    tokio::join!(
                        c.chat(chat_body(), &[("x-sim-fault", "500")]),
                        c.chat(chat_body(), &[("x-sim-fault", "429;retry-after-ms=0")]),
                        c.chat(chat_body(), &[("x-sim-fault", "content-filter")]),
                        c.chat(
                            stream_body(true),
                            &[("x-sim-fault", "reset-after-chunks=3")]
                        ),
                    )
                },
                async {
                    tokio::join!(
                        async {
                            c.bytes("application/json", chat_body_of_len(BODY_LIMIT, false))
                                .await
                        },
                        big(1),
                        big(2),
                        big(3),
                        big(4),
                        async {
                            c.bytes("application/json", chat_body_of_len(BODY_LIMIT + 1, false))
                                .await
                        },
                    )
                },
                async {
                    tokio::join!(
                    c.bytes(
                        "application/json",
                        format!(
                            r#"{{"messages":[{{"role":"user","content":"hi"}}],"metadata":{}1{}}}"#,
                            "[".repeat(200),
                            "]".repeat(200)
                        )
                        .into_bytes()
                    ),
                    c.bytes(
                        "application/json",
                        b"{\"messages\": \"\xff\xfe\x00\x80\"}".to_vec()
                    ),
                    c.bytes("text/plain", chat_body().to_string().into_bytes()),
                    async {
                        c.send(
                            c.post(&format!("{CHAT}?{API}&api-key=pipeline-query-secret"))
                                .header("api-key", KEY)
                                .json(&chat_body()),
                        )
                        .await
                    },
                )
                },
                async {
                    tokio::join!(
                        stall_body,
                        stall_headers,
                        async {
                            c.send(
                                c.post("/openai/v1/chat/completions")
                                    .header("api-key", KEY)
                                    .json(&chat_body()),
                            )
                            .await
                        },
                        async {
                            c.send(
                                c.post(&format!(
                                    "/openai/deployments/no-such-deployment/chat/completions?{API}"
                                ))
                                .header("api-key", KEY)
                                .json(&chat_body()),
                            )
                            .await
                        },
                    )
                },
                async {
                    tokio::join!(
                        c.raw(&traversal, &[("api-key", KEY)], b"{}"),
                        async {
                            c.send(c.post(&format!("{CHAT}?{API}")).json(&chat_body()))
                                .await
                        },
                        async {
                            c.send(
                                c.post(&format!("{CHAT}?{API}"))
                                    .header("api-key", KEY)
                                    .header("x-big", "b".repeat(20_000))
                                    .json(&chat_body()),
                            )
                            .await
                        },
                        c.raw("/v1/chat/completions", &[("api-key", KEY)], b"{}"),
                    )
                },
            )
        }),
    )
    .await;

    expect_answer(&mut expected, "non-stream", &plain1, 200, Some(Reported));
    expect_answer(
        &mut expected,
        "non-stream max_tokens",
        &plain2,
        200,
        Some(Reported),
    );
    expect_answer(
        &mut expected,
        "non-stream gpt-4o-mini",
        &mini,
        200,
        Some(Reported),
    );
    expect_answer(
        &mut expected,
        "stream with usage",
        &stream1,
        200,
        Some(Reported),
    );
    expect_answer(
        &mut expected,
        "paced stream with usage",
        &stream2,
        200,
        Some(Reported),
    );
    expect_answer(
        &mut expected,
        "stream without usage",
        &stream_no_usage,
        200,
        // Tollgate asked AOAI for the usage on the client's behalf.
        Some(Reported),
    );
    expect_answer(&mut expected, "sim 500", &e500, 500, None);
    expect_answer(&mut expected, "sim 429", &e429, 429, None);
    expect_answer(&mut expected, "sim content filter", &filtered, 400, None);
    expect_answer(&mut expected, "stream cut by the backend", &cut, 200, None);
    for (i, a) in [&big0, &big1, &big2, &big3, &big4].into_iter().enumerate() {
        expect_answer(
            &mut expected,
            &format!("body near the limit #{i}"),
            a,
            200,
            Some(Reported),
        );
    }
    expect_answer(&mut expected, "body over the limit", &over, 413, None);
    assert_eq!(over.json()["error"]["code"], "RequestEntityTooLarge");
    expect_answer(
        &mut expected,
        "JSON 200 deep (sim refuses)",
        &deep,
        400,
        None,
    );
    expect_answer(&mut expected, "not UTF-8 (sim refuses)", &binary, 400, None);
    expect_answer(
        &mut expected,
        "JSON as text/plain",
        &text_plain,
        200,
        Some(Reported),
    );
    expect_answer(
        &mut expected,
        "credential in the query",
        &query_secret,
        200,
        Some(Reported),
    );
    assert_eq!(stall_status, 408, "{stall_body_json}");
    assert_eq!(stall_body_json["error"]["code"], "RequestTimeout");
    let stall_id = stall_id.expect("the 408 carries a request id");
    if let Some(cut) = expected
        .iter_mut()
        .find(|e| e.label == "stream cut by the backend")
    {
        cut.truncated = true;
    }
    expected.push(Expected {
        label: "stalled body".into(),
        id: stall_id,
        status: 408,
        usage: None,
        priced: false,
        truncated: false,
    });
    expect_answer(&mut expected, "v1 without model", &missing_model, 400, None);
    assert_eq!(missing_model.json()["error"]["code"], "MissingModel");
    expect_answer(&mut expected, "unknown deployment", &unknown, 404, None);
    let (status, id, body) = bad_path;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("InvalidPath"))
    );
    expected.push(Expected {
        label: "non-canonical path".into(),
        id: id.expect("the 400 carries a request id"),
        status: 400,
        usage: None,
        priced: false,
        truncated: false,
    });
    expect_answer(&mut expected, "no key", &no_key, 401, None);
    expect_answer(&mut expected, "headers too large", &big_headers, 431, None);
    assert_eq!(
        big_headers.json()["error"]["code"],
        "RequestHeadersTooLarge"
    );
    let (status, id, _) = outside;
    assert_eq!(status, 404, "outside /openai/");
    assert!(id.is_some(), "the 404 carries a request id");

    // Phase 2: clients that leave before AOAI's headers, one at a time on a quiet proxy so the
    // metrics say which request is under way.
    c.flush().await;
    c.leave_before_the_headers(&chat_body(), "hostile/left-non-stream")
        .await;
    c.leave_before_the_headers(&stream_body(true), "hostile/left-stream")
        .await;

    // Phase 3: an ordinary request last; the feed must reach it.
    let last = c.chat(chat_body(), &[]).await;
    expect_answer(
        &mut expected,
        "last ordinary request",
        &last,
        200,
        Some(Reported),
    );
    c.flush().await;

    let peak_kib = up.peak_rss_kib();
    eprintln!(
        "tollgate up peak RSS (VmHWM): {:.1} MiB after start, {:.1} MiB after the run (bound {} MiB)",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        PEAK_RSS_BOUND_KIB / 1024
    );

    let store = open_store(&data).await;
    let (all, count) = consolidated(store.as_ref()).await;
    let mut problems = Vec::new();
    for e in &expected {
        let n = count.get(e.id.as_str()).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!("{}: {n} consolidated records", e.label));
            continue;
        }
        let r: ConsolidatedRecord = store
            .get(&e.id)
            .await
            .expect("get")
            .expect("listed, so present");
        if r.status != Some(e.status) {
            problems.push(format!(
                "{}: status {:?}, not {}",
                e.label, r.status, e.status
            ));
        }
        if !r.complete {
            problems.push(format!("{}: not complete", e.label));
        }
        if e.truncated && !r.truncated {
            problems.push(format!("{}: not marked truncated", e.label));
        }
        match (e.usage, &r.usage) {
            (Some(source), Some(u)) if u.source == source && u.total_tokens > 0 => {}
            (Some(source), u) => problems.push(format!("{}: usage {u:?}, not {source:?}", e.label)),
            (None, _) => {}
        }
        if e.priced && r.cost.is_none() {
            problems.push(format!("{}: no cost", e.label));
        }
    }
    for (agent, stream) in [
        ("hostile/left-non-stream", false),
        ("hostile/left-stream", true),
    ] {
        let mine: Vec<&ConsolidatedRecord> = all
            .iter()
            .filter(|r| r.user_agent.as_deref() == Some(agent))
            .collect();
        let [r] = mine.as_slice() else {
            problems.push(format!("{agent}: {} consolidated records", mine.len()));
            continue;
        };
        if r.status != Some(200) || !r.client_disconnected || r.stream != stream {
            problems.push(format!(
                "{agent}: status {:?}, client_disconnected {}, stream {}",
                r.status, r.client_disconnected, r.stream
            ));
        }
        match &r.usage {
            Some(u) if u.source == UsageSource::Reported && u.total_tokens > 0 => {}
            u => problems.push(format!("{agent}: usage {u:?}, not reported by AOAI")),
        }
        if r.cost.as_ref().is_none_or(|c| c.total.nanos() <= 0) {
            problems.push(format!("{agent}: cost {:?}", r.cost));
        }
    }
    // Nothing else was consolidated: not the stalled headers, not the path outside /openai/.
    if all.len() != expected.len() + 2 {
        problems.push(format!(
            "{} consolidated records, expected {}",
            all.len(),
            expected.len() + 2
        ));
    }
    for r in &all {
        let text = serde_json::to_string(r).expect("serialise");
        if text.contains("pipeline-query-secret") {
            problems.push(format!("the query credential is in {}", r.id));
        }
    }
    // Nor in any raw record.
    let mut position: Option<String> = None;
    for _ in 0..10_000 {
        let page = store
            .read(tollgate_store::embedded::UNIT, position.as_deref(), 500)
            .await
            .expect("feed");
        if page.records.is_empty() && page.dead_letters.is_empty() {
            break;
        }
        if !page.dead_letters.is_empty() {
            problems.push(format!("unreadable raw records: {:?}", page.dead_letters));
        }
        for r in &page.records {
            if serde_json::to_string(r)
                .expect("serialise")
                .contains("pipeline-query-secret")
            {
                problems.push(format!("the query credential is in raw record {}", r.id()));
            }
        }
        position = page.position;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        peak_kib < PEAK_RSS_BOUND_KIB,
        "peak RSS {peak_kib} KiB over the bound {PEAK_RSS_BOUND_KIB} KiB"
    );
}
