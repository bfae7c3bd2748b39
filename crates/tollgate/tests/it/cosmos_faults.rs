//! The proxy and parser on the Cosmos DB store when Cosmos misbehaves: throttling (429 with
//! `x-ms-retry-after-ms`) and an outage. A small HTTP wrapper between the client and the Cosmos
//! test server injects the faults; the test server itself models neither.
//!
//! The wrapper rewrites the account document (`GET /`) to advertise itself: the SDK sends data
//! operations to the endpoints the account advertises, which would otherwise bypass it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_store::conformance::cosmos_test_config;
use tollgate_store::{Store, StoreConfig};

use crate::harness::{self, Stack, request_id};

const RETRY_AFTER_MS: u64 = 150;

/// Faults to inject, switched by the test.
#[derive(Default)]
struct Faults {
    /// Answer this many more document writes with 429.
    throttle: AtomicUsize,
    /// Answer everything with 503, as an account that is down.
    down: AtomicBool,
    /// When each throttled write was answered, and when each write arrived, with a digest
    /// of its body: a retry sends the same body again.
    throttled_at: std::sync::Mutex<Vec<(Instant, u32)>>,
    writes_at: std::sync::Mutex<Vec<(Instant, u32)>>,
}

struct Wrapper {
    upstream: String,
    own: String,
    http: reqwest::Client,
    faults: Arc<Faults>,
}

fn is_document_write(req: &Request) -> bool {
    req.method() == axum::http::Method::POST
        && req.uri().path().ends_with("/docs")
        && !req.headers().contains_key("x-ms-documentdb-isquery")
}

async fn forward(State(w): State<Arc<Wrapper>>, req: Request) -> Response {
    let f = &w.faults;
    if f.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"code": "ServiceUnavailable", "message": "down for the test"})),
        )
            .into_response();
    }
    let write = is_document_write(&req);
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("request body");
    if write {
        let digest = crc32fast::hash(&bytes);
        f.writes_at
            .lock()
            .expect("times")
            .push((Instant::now(), digest));
        let throttle = f
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttle {
            f.throttled_at
                .lock()
                .expect("times")
                .push((Instant::now(), digest));
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"code": "TooManyRequests", "message": "Request rate is large."})),
            )
                .into_response();
            let h = resp.headers_mut();
            h.insert(
                "x-ms-retry-after-ms",
                HeaderValue::from_str(&RETRY_AFTER_MS.to_string()).expect("header"),
            );
            h.insert("x-ms-substatus", HeaderValue::from_static("3200"));
            return resp;
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut out = w
        .http
        .request(parts.method.clone(), format!("{}{}", w.upstream, path));
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            out = out.header(name, value);
        }
    }
    let resp = out.body(bytes).send().await.expect("upstream");
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = resp.bytes().await.expect("upstream body").to_vec();
    if path == "/" {
        let text = String::from_utf8_lossy(&body).replace(&w.upstream, &w.own);
        body = text.into_bytes();
    }
    let mut reply = Response::new(Body::from(body));
    *reply.status_mut() = status;
    for (name, value) in &headers {
        if name != "content-length" && name != "transfer-encoding" {
            reply.headers_mut().insert(name, value.clone());
        }
    }
    reply
}

/// A wrapper in front of the Cosmos test server; its endpoint and its switches.
async fn wrapper() -> (String, Arc<Faults>) {
    let upstream = tollgate_store::conformance::cosmos_test_server();
    let upstream = upstream.trim_end_matches('/').to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let own = format!("http://{addr}");
    let faults = Arc::new(Faults::default());
    let state = Arc::new(Wrapper {
        upstream,
        own: own.clone(),
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        faults: faults.clone(),
    });
    let router = axum::Router::new().fallback(forward).with_state(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("{own}/"), faults)
}

/// The in-process stack on a Cosmos store reached through the wrapper.
async fn stack(name: &str) -> (Stack, Arc<Faults>) {
    let (endpoint, faults) = wrapper().await;
    let mut config = cosmos_test_config(&format!("{name}-{}", std::process::id()));
    config.endpoint = endpoint;
    let store: Arc<dyn Store> = tollgate_store::open(&StoreConfig::Cosmos(config))
        .await
        .expect("open the Cosmos store");
    let dir = tempfile::tempdir().expect("temp dir");
    let s = harness::start_on(dir, store, |_| {}, Vec::new()).await;
    (s, faults)
}

/// `n` requests, eight at a time (half streams): load while Cosmos misbehaves.
async fn send(s: &Stack, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (http, url, key) = (s.http.clone(), s.chat_url("gpt-4o"), crate::harness::KEY);
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in (worker..n).step_by(8) {
                let body = json!({"messages": [{"role": "user", "content": format!("q{i}")}], "stream": i % 2 == 0});
                let resp = http
                    .post(&url)
                    .header("api-key", key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "Cosmos's trouble is invisible to clients");
                ids.push(request_id(&resp));
                resp.text().await.unwrap();
            }
            ids
        });
    }
    while let Some(done) = tasks.join_next().await {
        ids.extend(done.expect("client task"));
    }
    ids
}

async fn all_recorded(s: &Stack, ids: &[String]) {
    for id in ids {
        let r = s.record(id).await;
        assert!(r.complete && r.usage.is_some(), "{id} fully recorded");
    }
}

/// Cosmos throttles writes: they are sent again no sooner than Cosmos asked, and nothing is
/// lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_writes_wait_the_retry_after_and_lose_nothing() {
    let (s, faults) = stack("throttle").await;
    faults.throttle.store(3, Ordering::SeqCst);
    let ids = send(&s, 16).await;
    s.settle().await;
    all_recorded(&s, &ids).await;
    assert_eq!(
        faults.throttle.load(Ordering::SeqCst),
        0,
        "three writes throttled"
    );
    let throttled = faults.throttled_at.lock().unwrap().clone();
    let writes = faults.writes_at.lock().unwrap().clone();
    assert_eq!(throttled.len(), 3);
    for (t, digest) in &throttled {
        let retry = writes
            .iter()
            .find(|(w, d)| w > t && d == digest)
            .map(|(w, _)| *w)
            .expect("each throttled write is sent again");
        assert!(
            retry.duration_since(*t) >= Duration::from_millis(RETRY_AFTER_MS),
            "retried {:?} after a 429 that asked for {RETRY_AFTER_MS} ms",
            retry.duration_since(*t)
        );
    }
    let listed = s
        .store
        .list(&tollgate_store::RecordQuery::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), ids.len(), "each request once");
}

/// Cosmos is down while requests are served: clients see nothing, records wait in the spool,
/// and once Cosmos is back the spool drains into it and every request is consolidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spools_and_the_spool_drains_when_cosmos_is_back() {
    let (s, faults) = stack("outage").await;
    faults.down.store(true, Ordering::SeqCst);
    let ids = send(&s, 48).await;
    s.proxy.flush().await;
    assert!(
        s.proxy.recorder().spooled_bytes() > 0,
        "records wait in the spool"
    );
    faults.down.store(false, Ordering::SeqCst);
    s.settle().await;
    assert_eq!(s.proxy.recorder().spooled_bytes(), 0, "the spool drained");
    all_recorded(&s, &ids).await;
}

/// Found in review: a consolidated record over Cosmos DB's 2 MB item limit (a prompt of a few
/// MB, which the proxy accepts and records in parts) was retried for ever and held its unit's
/// checkpoint, and every unit after it. It is now stored without its content, billed and
/// measured, and the feed moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_cosmos_is_stored_without_its_content() {
    let (s, _faults) = stack("large").await;
    let big = "lorem ipsum ".repeat(250_000);
    let resp = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": big}]}),
        )
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    resp.text().await.unwrap();
    let after = send(&s, 4).await;
    s.settle().await;
    let r = s.record(&id).await;
    assert!(r.prompt.is_none(), "the prompt is dropped");
    assert!(
        r.status.is_some() && r.complete,
        "still billed and measured"
    );
    all_recorded(&s, &after).await;
}
