//! Backend pools: several simulator instances behind one deployment, each answering as an AOAI
//! resource would (a throttled one with 429 and its retry-after, one that cannot be reached).
//! Which backend served a request is read from its consolidated record.

use std::collections::BTreeMap;

use serde_json::json;
use tollgate_aoai_sim::{SimConfig, Simulator};
use tollgate_logging_proxy::config::BackendConfig;

use crate::harness::{self, SIM_KEY, Stack, request_id, serve};

/// A simulator of its own, answering every request with `fault` when given.
async fn sim(fault: Option<&str>) -> String {
    let sim = Simulator::new(SimConfig {
        api_key: Some(SIM_KEY.into()),
        fault: fault.map(str::to_owned),
        ..SimConfig::default()
    })
    .expect("sim");
    format!("http://{}", serve(sim.router()).await)
}

fn backend(name: &str, endpoint: &str, priority: u32, weight: u32) -> BackendConfig {
    BackendConfig {
        name: name.into(),
        priority,
        weight,
        endpoint: endpoint.into(),
        api_key: Some(SIM_KEY.to_owned().into()),
        deployments: vec!["gpt-4o".into()],
        ..Default::default()
    }
}

async fn stack(backends: Vec<BackendConfig>) -> Stack {
    harness::start(|c| c.backends = backends).await
}

/// Sends `n` chat requests one after another; each answer's status and request id.
async fn send(s: &Stack, n: usize) -> Vec<(u16, String)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let resp = s
            .post(
                &s.chat_url("gpt-4o"),
                &json!({"messages": [{"role": "user", "content": format!("q{i}")}], "max_tokens": 4}),
            )
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let id = request_id(&resp);
        resp.text().await.unwrap();
        out.push((status, id));
    }
    out
}

/// How many of `ids` each backend answered, by their consolidated records.
async fn served_by(s: &Stack, ids: &[(u16, String)]) -> BTreeMap<String, usize> {
    s.settle().await;
    let mut by = BTreeMap::new();
    for (_, id) in ids {
        let r = s.record(id).await;
        *by.entry(r.backend.unwrap_or_default()).or_insert(0) += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_a_priority_three_to_one() {
    let (a, b) = (sim(None).await, sim(None).await);
    let s = stack(vec![backend("a", &a, 0, 3), backend("b", &b, 0, 1)]).await;
    let answers = send(&s, 2000).await;
    assert!(answers.iter().all(|(st, _)| *st == 200));
    let by = served_by(&s, &answers).await;
    let share = by.get("a").copied().unwrap_or(0) as f64 / 2000.0;
    // 0.75 expected; a binomial's standard deviation here is about 0.01.
    assert!((share - 0.75).abs() < 0.04, "{by:?}");
}

/// A backend answering 429 rests for its retry-after: the request that met it is sent to the
/// next backend without the client seeing the 429, the throttled one gets nothing more while
/// it rests, and its share goes to the two others of the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_backend_rests_and_its_requests_move_on() {
    let throttled = sim(Some("429;retry-after-ms=600000")).await;
    let (one, two) = (sim(None).await, sim(None).await);
    let s = stack(vec![
        backend("throttled", &throttled, 0, 1),
        backend("one", &one, 0, 1),
        backend("two", &two, 0, 1),
    ])
    .await;
    let answers = send(&s, 60).await;
    assert!(answers.iter().all(|(st, _)| *st == 200), "{answers:?}");
    s.settle().await;
    let mut throttled_attempts = 0;
    let mut served = BTreeMap::new();
    for (_, id) in &answers {
        let r = s.record(id).await;
        *served
            .entry(r.backend.clone().unwrap_or_default())
            .or_insert(0) += 1;
        for a in &r.attempts {
            if a.backend == "throttled" {
                assert_eq!(a.status, Some(429));
                assert_eq!(a.retry_after_ms, Some(600_000));
                throttled_attempts += 1;
            }
        }
    }
    assert_eq!(throttled_attempts, 1, "one 429, then it rests");
    // The storm moves to the other two, shared between them (60 at 1:1; either taking all
    // is 2^-58).
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["one", "two"],
        "{served:?}"
    );
}

/// The lower priority (PTU) first; a backend that cannot be reached is passed over to the next
/// priority (pay-as-you-go) invisibly, and the record keeps both attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_be_reached_falls_back_to_the_next_priority() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let spill = sim(None).await;
    let s = stack(vec![
        backend("ptu", &closed, 0, 1),
        backend("paygo", &spill, 1, 1),
    ])
    .await;
    let answers = send(&s, 3).await;
    assert!(answers.iter().all(|(st, _)| *st == 200), "{answers:?}");
    s.settle().await;
    let r = s.record(&answers[0].1).await;
    assert_eq!(r.backend.as_deref(), Some("paygo"));
    assert_eq!(r.attempts.len(), 2, "{:?}", r.attempts);
    assert_eq!(r.attempts[0].backend, "ptu");
    assert!(r.attempts[0].error.is_some() && r.attempts[0].status.is_none());
    assert_eq!(r.attempts[1].status, Some(200));
}

/// When every backend of the pool rests, Tollgate answers 429 itself with the shortest rest
/// left, as AOAI would, and records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_rests_the_client_gets_429_with_the_shortest_rest() {
    let a = sim(Some("429;retry-after-ms=30000")).await;
    let b = sim(Some("429;retry-after-ms=60000")).await;
    let s = stack(vec![backend("a", &a, 0, 1), backend("b", &b, 0, 1)]).await;
    // The first request meets both: the last backend's 429 is the client's.
    let first = send(&s, 1).await;
    assert_eq!(first[0].0, 429);
    let resp = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": "again"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let ms: u64 = resp.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29_000..=30_000).contains(&ms), "the shortest rest: {ms}");
    assert_eq!(resp.headers()["retry-after"], "30");
    let id = request_id(&resp);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.status, Some(429));
    assert!(r.attempts.is_empty(), "no backend was tried");
}

/// Consecutive 5xx answers open a backend's circuit breaker: after `breaker_failures` of them
/// it gets no request until its cooldown is over (the half-open trial is in pool.rs's tests),
/// and the client never sees them while another backend answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_trips_its_breaker_and_is_passed_over() {
    let failing = sim(Some("500")).await;
    let spare = sim(None).await;
    let s = harness::start(|c| {
        c.backends = vec![
            backend("failing", &failing, 0, 1),
            backend("spare", &spare, 1, 1),
        ];
        c.limits.breaker_failures = 2;
        c.limits.breaker_cooldown_ms = 600_000;
    })
    .await;
    let answers = send(&s, 6).await;
    assert!(answers.iter().all(|(st, _)| *st == 200), "{answers:?}");
    s.settle().await;
    let mut tried = 0;
    for (_, id) in &answers {
        let r = s.record(id).await;
        assert_eq!(r.backend.as_deref(), Some("spare"));
        tried += r.attempts.iter().filter(|a| a.backend == "failing").count();
    }
    assert_eq!(tried, 2, "tried until its breaker opened, then passed over");
}

/// A deployment may have another name on a backend than the one clients call, and the backend's
/// key may live in a file (as Container Apps mounts a Key Vault secret) instead of the
/// configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_its_own_deployment_name_and_its_key_in_a_file() {
    let upstream = sim(None).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("aoai-key");
    std::fs::write(&key_file, format!("{SIM_KEY}\n")).unwrap();
    let s = stack(vec![BackendConfig {
        name: "renamed".into(),
        api_key_file: Some(key_file),
        deployment_names: [("chat".to_owned(), "gpt-4o".to_owned())].into(),
        endpoint: upstream,
        deployments: vec!["chat".into()],
        ..Default::default()
    }])
    .await;
    let resp = s
        .post(
            &s.chat_url("chat"),
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(
        r.deployment.as_deref(),
        Some("chat"),
        "recorded as the client called it"
    );
    assert_eq!(r.backend.as_deref(), Some("renamed"));
}

/// `/readyz` says a replica cannot serve a deployment whose every backend rests (or is
/// tripped), naming it, so a load balancer sends its traffic elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_deployment_with_no_backend_available() {
    let throttled = sim(Some("429;retry-after-ms=600000")).await;
    let s = stack(vec![backend("only", &throttled, 0, 1)]).await;
    let ready = |s: &Stack| {
        let (http, url) = (s.http.clone(), format!("{}/readyz", s.base));
        async move { http.get(url).send().await.unwrap() }
    };
    assert_eq!(ready(&s).await.status(), 200);
    assert_eq!(send(&s, 1).await[0].0, 429);
    let resp = ready(&s).await;
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["deployments"], json!(["gpt-4o"]));
}

/// The admin metrics show each backend's state: available, resting after a 429 (with the rest
/// left), breaker open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_metrics_show_each_backends_state() {
    let throttled = sim(Some("429;retry-after-ms=600000")).await;
    let healthy = sim(None).await;
    let s = harness::start(|c| {
        c.backends = vec![
            backend("throttled", &throttled, 0, 1),
            backend("healthy", &healthy, 1, 1),
        ];
        c.admin_key_sha256 = Some(harness::sha("admin"));
    })
    .await;
    assert_eq!(send(&s, 1).await[0].0, 200);
    let text = s.metrics("admin").await;
    let value = |line: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} in:\n{text}"))
    };
    assert_eq!(
        value("tollgate_backend_available{backend=\"throttled\"}"),
        0.0
    );
    assert_eq!(
        value("tollgate_backend_available{backend=\"healthy\"}"),
        1.0
    );
    let rest = value("tollgate_backend_rest_seconds{backend=\"throttled\"}");
    assert!((599.0..=600.0).contains(&rest), "{rest}");
    assert_eq!(
        value("tollgate_backend_breaker_open{backend=\"throttled\"}"),
        0.0
    );
}

/// A stream through `s` to `deployment`, its head and first chunk read: the request is in
/// flight until the rest is read. `inter_token_ms` paces the simulator's frames.
async fn open_stream(s: &Stack, inter_token_ms: u64) -> (String, reqwest::Response) {
    let mut resp = s
        .post(
            &s.chat_url("gpt-4o"),
            &json!({"messages": [{"role": "user", "content": "stream"}], "stream": true,
                "max_tokens": 32}),
        )
        .header("x-sim-inter-token-ms", inter_token_ms.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(resp.chunk().await.unwrap().is_some(), "a first chunk");
    (id, resp)
}

/// Reads what is left of a stream; whether it ended with `[DONE]`.
async fn finish(mut resp: reqwest::Response) -> bool {
    let mut rest = Vec::new();
    while let Ok(Some(c)) = resp.chunk().await {
        rest.extend_from_slice(&c);
    }
    String::from_utf8_lossy(&rest).contains("[DONE]")
}

/// The proxy configuration the harness starts with, around `backends`.
fn config_with(backends: Vec<BackendConfig>) -> tollgate_logging_proxy::ProxyConfig {
    tollgate_logging_proxy::ProxyConfig {
        consumers: vec![tollgate_logging_proxy::config::ConsumerConfig {
            id: "tester".into(),
            key_sha256: vec![harness::sha(harness::KEY)],
            ..Default::default()
        }],
        backends,
        ..Default::default()
    }
}

/// A reload swaps a pool's backends without a restart: a stream already on the removed
/// backend runs to its end (and is recorded as served by it), new requests go to the added
/// one, and a reload that is invalid or touches what needs a restart changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_new_requests_and_leaves_streams_in_flight_alone() {
    let (old, new) = (sim(None).await, sim(None).await);
    let s = stack(vec![backend("old", &old, 0, 1)]).await;
    let (stream_id, stream) = open_stream(&s, 20).await;
    let reloaded = s
        .proxy
        .reload(&config_with(vec![backend("new", &new, 0, 1)]))
        .expect("reloaded");
    assert_eq!(reloaded.backends_removed, ["old"]);
    assert_eq!(reloaded.backends_added, ["new"]);
    assert!(
        finish(stream).await,
        "the stream on the removed backend ends normally"
    );
    let after = send(&s, 5).await;
    assert!(after.iter().all(|(st, _)| *st == 200), "{after:?}");
    assert_eq!(
        served_by(&s, &after).await,
        BTreeMap::from([("new".into(), 5)])
    );
    let r = s.record(&stream_id).await;
    assert_eq!(r.backend.as_deref(), Some("old"));
    assert!(r.complete && !r.truncated, "{r:?}");

    // Refused, and nothing changes: an invalid file, and a section a reload cannot apply.
    let invalid = config_with(vec![backend("bad", "ftp://x", 0, 1)]);
    assert!(s.proxy.reload(&invalid).is_err());
    let mut limits = config_with(vec![backend("new", &new, 0, 1)]);
    limits.limits.max_attempts = 7;
    let refused = s.proxy.reload(&limits).unwrap_err();
    assert!(refused.to_string().contains("restart"), "{refused}");
    let after = send(&s, 2).await;
    assert_eq!(
        served_by(&s, &after).await,
        BTreeMap::from([("new".into(), 2)])
    );
}

/// A backend at its `max_concurrent_requests` is passed over as a resting one is; its slot is
/// held until the stream's end, then it takes requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_is_passed_over_until_its_stream_ends() {
    let (small, spill) = (sim(None).await, sim(None).await);
    let mut one = backend("small", &small, 0, 1);
    one.max_concurrent_requests = Some(1);
    let s = stack(vec![one, backend("spill", &spill, 1, 1)]).await;
    // 32 frames 100 ms apart: open well past the three requests sent meanwhile.
    let (stream_id, stream) = open_stream(&s, 100).await;
    let during = send(&s, 3).await;
    assert!(during.iter().all(|(st, _)| *st == 200), "{during:?}");
    assert!(finish(stream).await);
    let after = send(&s, 1).await;
    s.settle().await;
    assert_eq!(s.record(&stream_id).await.backend.as_deref(), Some("small"));
    for (_, id) in &during {
        let r = s.record(id).await;
        assert_eq!(r.backend.as_deref(), Some("spill"));
        assert_eq!(
            r.attempts.len(),
            1,
            "a full backend is not an attempt: {r:?}"
        );
    }
    assert_eq!(
        s.record(&after[0].1).await.backend.as_deref(),
        Some("small")
    );
}

/// A backend marked `include_usage = false` gets streams as the client sent them: no
/// `stream_options` tried and refused first (its fault answers any `stream_options` with
/// 400, which would show as a first attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_include_usage_gets_the_clients_own_stream_request() {
    let old_gateway = sim(Some("no-stream-options")).await;
    let mut b = backend("old-gateway", &old_gateway, 0, 1);
    b.include_usage = false;
    let s = stack(vec![b]).await;
    let (id, stream) = open_stream(&s, 0).await;
    assert!(finish(stream).await);
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.attempts.len(), 1, "{:?}", r.attempts);
    assert_eq!(r.attempts[0].status, Some(200));
    let reason = r.usage_quality.and_then(|q| q.reason).unwrap_or_default();
    assert!(reason.contains("without include_usage"), "{reason}");
}

/// Defect found in review: a backend's answer was dropped for a retry when the only backend
/// left had filled up meanwhile, and the client got a 500 for nothing. The throttled answer
/// (slow to come, so the spare fills first) is now the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_not_dropped_for_a_backend_that_filled_up() {
    let slow_throttled = sim(Some("429;retry-after-ms=0;slow-first-byte=3000")).await;
    let spare = sim(None).await;
    let mut small = backend("small", &spare, 1, 1);
    small.deployments = vec!["gpt-4o".into(), "gpt-4o-mini".into()];
    small.max_concurrent_requests = Some(1);
    let s = stack(vec![backend("slow", &slow_throttled, 0, 1), small]).await;
    let main = {
        let (url, http) = (s.chat_url("gpt-4o"), s.http.clone());
        tokio::spawn(async move {
            http.post(url)
                .header("api-key", harness::KEY)
                .json(&json!({"messages": [{"role": "user", "content": "q"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    // Another deployment only `small` serves takes its one slot while `slow` thinks.
    let mut filler = s
        .post(
            &s.chat_url("gpt-4o-mini"),
            &json!({"messages": [{"role": "user", "content": "hold"}], "stream": true}),
        )
        .header("x-sim-inter-token-ms", "200")
        .send()
        .await
        .unwrap();
    assert_eq!(filler.status(), 200);
    assert!(filler.chunk().await.unwrap().is_some());
    assert_eq!(
        main.await.unwrap(),
        429,
        "the backend's own answer, not a 500"
    );
    drop(filler);
}

/// A backend's price multiplier (PTU charged at an internal rate) is recorded with the
/// request and applied to its cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_price_multiplier_reaches_the_cost() {
    let ptu = sim(None).await;
    let mut b = backend("ptu", &ptu, 0, 1);
    b.price_multiplier = Some(0.4);
    let s = stack(vec![b]).await;
    let answers = send(&s, 1).await;
    s.settle().await;
    let r = s.record(&answers[0].1).await;
    let cost = r.cost.expect("priced");
    assert_eq!(cost.price_multiplier, Some(0.4));
    let end = s
        .raw(&answers[0].1)
        .await
        .into_iter()
        .find_map(|r| match r {
            tollgate_records::RawRecord::End(e) => Some(e),
            _ => None,
        })
        .expect("end record");
    assert_eq!(end.price_multiplier, Some(0.4));
}

/// A stream the backend cuts after its first frames is not retried on another backend (bytes
/// have gone to the client): the client sees the cut, the record says the answer was cut,
/// and the spare backend got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_midway_is_not_retried() {
    let cutting = sim(Some("reset-after-chunks=3")).await;
    let spare = sim(None).await;
    let s = stack(vec![
        backend("cutting", &cutting, 0, 1),
        backend("spare", &spare, 1, 1),
    ])
    .await;
    let (id, stream) = open_stream(&s, 0).await;
    assert!(!finish(stream).await, "the client sees the stream cut");
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.backend.as_deref(), Some("cutting"));
    assert!(
        r.attempts.iter().all(|a| a.backend == "cutting"),
        "{:?}",
        r.attempts
    );
    assert!(r.truncated, "{r:?}");
}

/// `tollgate check`'s probe tells each backend's problem apart without generating anything:
/// a refused key, a deployment the backend does not have, a backend that cannot be reached,
/// and a good one (renamed deployment included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_names_what_is_wrong_with_each_backend() {
    let good = sim(None).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut wrong_key = backend("wrong-key", &good, 0, 1);
    wrong_key.api_key = Some("not-the-key".to_owned().into());
    let mut missing = backend("missing", &good, 0, 1);
    missing.deployments = vec!["gpt-4o".into(), "chat".into()];
    missing.deployment_names = [("chat".to_owned(), "no-such-deployment".to_owned())].into();
    let config = config_with(vec![
        backend("good", &good, 0, 1),
        wrong_key,
        missing,
        backend("closed", &closed, 0, 1),
    ]);
    let probes = tollgate_logging_proxy::probe_backends(&config)
        .await
        .unwrap();
    let found: Vec<(String, String, bool, Option<u16>)> = probes
        .into_iter()
        .map(|p| (p.backend, p.deployment, p.ok, p.status))
        .collect();
    let row =
        |b: &str, d: &str, ok: bool, status: Option<u16>| (b.to_owned(), d.to_owned(), ok, status);
    assert_eq!(
        found,
        vec![
            row("good", "gpt-4o", true, Some(400)),
            row("wrong-key", "gpt-4o", false, Some(401)),
            row("missing", "gpt-4o", true, Some(400)),
            row("missing", "chat", false, Some(404)),
            row("closed", "gpt-4o", false, None),
        ]
    );
}

/// Retries stop at the deadline: a backend that fails only after the deadline has passed
/// leaves its answer with the client instead of starting another attempt; with time left the
/// same failure moves on to the spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_starts_past_the_retry_deadline() {
    let slow_failing = sim(Some("500;slow-first-byte=400")).await;
    let spare = sim(None).await;
    for (deadline_ms, status, attempts) in [(100, 500, 1), (60_000, 200, 2)] {
        let s = harness::start(|c| {
            c.backends = vec![
                backend("slow-failing", &slow_failing, 0, 1),
                backend("spare", &spare, 1, 1),
            ];
            c.limits.retry_deadline_ms = deadline_ms;
        })
        .await;
        let answers = send(&s, 1).await;
        assert_eq!(answers[0].0, status, "deadline {deadline_ms} ms");
        s.settle().await;
        let r = s.record(&answers[0].1).await;
        assert_eq!(r.attempts.len(), attempts, "{:?}", r.attempts);
    }
}

/// A multipart upload of `content` as the Files API takes it.
fn file_upload(content: &str) -> (String, Vec<u8>) {
    let boundary = "tollgate-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.into_bytes(),
    )
}

/// Calls that keep state on a backend are never balanced: a file uploaded through a pool of
/// two resources is on the stateful one, and every later call on its id reaches it (balanced,
/// half would meet the other resource's 404). Stored responses go there too; a response
/// with `store: false` is balanced as any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_calls_stay_on_the_stateful_backend() {
    let (a, b) = (sim(None).await, sim(None).await);
    let mut keeper = backend("keeper", &b, 0, 1);
    keeper.stateful = true;
    let s = stack(vec![backend("other", &a, 0, 1), keeper]).await;
    let files = format!("{}/openai/files?{}", s.base, harness::API);
    let (content_type, body) = file_upload("{\"custom_id\": \"1\"}");
    let resp = s
        .http
        .post(&files)
        .header("api-key", harness::KEY)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let uploaded: serde_json::Value = resp.json().await.unwrap();
    let id = uploaded["id"].as_str().expect("file id").to_owned();
    let one = format!("{}/openai/files/{id}?{}", s.base, harness::API);
    for _ in 0..10 {
        let got = s
            .http
            .get(&one)
            .header("api-key", harness::KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.status(),
            200,
            "every retrieval reaches the file's backend"
        );
        let meta: serde_json::Value = got.json().await.unwrap();
        assert_eq!(meta["bytes"], 18);
    }
    let deleted = s
        .http
        .delete(&one)
        .header("api-key", harness::KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);

    // Found in review: listing stored chat completions (no body, no model) was refused as a
    // call missing its model; it reaches the stateful backend.
    let listed = s
        .http
        .get(format!("{}/openai/v1/chat/completions", s.base))
        .header("api-key", harness::KEY)
        .send()
        .await
        .unwrap();
    assert_ne!(listed.status(), 400, "not refused for want of a model");
    let listed_id = request_id(&listed);
    listed.text().await.unwrap();
    s.settle().await;
    assert_eq!(
        s.record(&listed_id).await.backend.as_deref(),
        Some("keeper")
    );

    let responses = format!("{}/openai/v1/responses", s.base);
    let mut ids = Vec::new();
    for (i, store) in [None, Some(false)].into_iter().enumerate() {
        for n in 0..20 {
            let mut body = json!({"model": "gpt-4o", "input": format!("r{i}-{n}")});
            if let Some(store) = store {
                body["store"] = json!(store);
            }
            let resp = s.post(&responses, &body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            ids.push((store, request_id(&resp)));
            resp.text().await.unwrap();
        }
    }
    s.settle().await;
    let mut stored = BTreeMap::new();
    let mut unstored = BTreeMap::new();
    for (store, id) in &ids {
        let r = s.record(id).await;
        let by = if store.is_none() {
            &mut stored
        } else {
            &mut unstored
        };
        *by.entry(r.backend.unwrap_or_default()).or_insert(0) += 1;
    }
    assert_eq!(stored, BTreeMap::from([("keeper".to_owned(), 20)]));
    assert_eq!(unstored.len(), 2, "balanced: {unstored:?}");
}

/// A backend that throttles its first request (`retry-after-ms: 200`) and then answers as the
/// simulator behind it does: the PTU that is full for a moment.
async fn throttles_once(upstream: String) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    let first = std::sync::Arc::new(AtomicBool::new(true));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (first, http, upstream) = (first.clone(), http.clone(), upstream.clone());
        async move {
            use axum::response::IntoResponse;
            if first.swap(false, Ordering::SeqCst) {
                return (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after-ms", "200")],
                    r#"{"error":{"code":"429","message":"Rate limit exceeded."}}"#,
                )
                    .into_response();
            }
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let url = format!("{upstream}{}", parts.uri);
            let resp = http
                .post(url)
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let mut out =
                axum::response::Response::new(axum::body::Body::from(resp.bytes().await.unwrap()));
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            out
        }
    });
    format!("http://{}", serve(app).await)
}

/// Priority fallback and return: the PTU backend's 429 sends the request to pay-as-you-go,
/// and once its rest is over (seen on the admin API, not waited for blindly) the PTU takes
/// requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_returns_to_the_lower_priority_once_its_rest_is_over() {
    let ptu = throttles_once(sim(None).await).await;
    let paygo = sim(None).await;
    let s = harness::start(|c| {
        c.backends = vec![backend("ptu", &ptu, 0, 1), backend("paygo", &paygo, 1, 1)];
        c.admin_key_sha256 = Some(harness::sha("admin"));
    })
    .await;
    let first = send(&s, 1).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let url = format!("{}/tollgate/admin/backends", s.base);
        let b = harness::get_json(&s.http, &url, "admin").await;
        if b["backends"][0]["state"] == "healthy" {
            break;
        }
        assert_eq!(b["backends"][0]["state"], "resting", "{b}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rest never ended"
        );
        tokio::task::yield_now().await;
    }
    let second = send(&s, 1).await;
    assert_eq!(
        served_by(&s, &first).await,
        BTreeMap::from([("paygo".into(), 1)])
    );
    assert_eq!(
        served_by(&s, &second).await,
        BTreeMap::from([("ptu".into(), 1)])
    );
}

/// A v1 audio transcription (multipart, binary audio) is routed by its `model` form field to
/// that deployment's pool and passed through; its body is recorded byte for byte as base64
/// with its content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_call_is_routed_by_its_model_field_and_recorded_as_sent() {
    let (a, b) = (sim(None).await, sim(None).await);
    let mut whisper = backend("whisper-backend", &b, 0, 1);
    whisper.deployments = vec!["whisper".into()];
    let s = stack(vec![backend("chat-backend", &a, 0, 1), whisper]).await;
    let boundary = "audio-boundary";
    let audio: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&audio);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let resp = s
        .http
        .post(format!("{}/openai/v1/audio/transcriptions", s.base))
        .header("api-key", harness::KEY)
        .header("content-type", &content_type)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    resp.text().await.unwrap();
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.deployment.as_deref(), Some("whisper"));
    assert_eq!(r.backend.as_deref(), Some("whisper-backend"));
    let request = s
        .raw(&id)
        .await
        .into_iter()
        .find_map(|r| match r {
            tollgate_records::RawRecord::Request(q) => Some(q),
            _ => None,
        })
        .expect("request record");
    match request.body {
        tollgate_records::Body::Base64 {
            content_type: recorded,
            data,
        } => {
            use base64::Engine as _;
            assert_eq!(recorded, content_type);
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap();
            assert_eq!(decoded, body, "recorded byte for byte");
        }
        other => panic!("binary multipart recorded as {other:?}"),
    }
}
