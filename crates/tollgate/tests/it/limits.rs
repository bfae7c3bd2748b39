//! Per-consumer limits (`quota.rs`) through the whole stack: requests per minute, tokens per
//! minute reserved from an estimate and settled with AOAI's usage, token quotas per day, per
//! deployment; refusals answered as AOAI and APIM answer them, recorded, and the other
//! consumers untouched.
//!
//! Minute windows are aligned to the clock: a test that counts within one minute first waits,
//! if the current minute is nearly over, for the next to begin (a wait on the clock itself,
//! not on another task), so its requests fall in one window.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tollgate_logging_proxy::config::ConsumerConfig;
use tollgate_logging_proxy::quota::ConsumerLimits;

use crate::harness::{self, Stack, request_id};

const OTHER_KEY: &str = "other-consumer-key";

/// Waits, when less than `need` of the current UTC minute is left, for the next one.
pub(crate) async fn whole_minute_ahead(need: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into = Duration::from_millis(u64::try_from(now.as_millis() % 60_000).unwrap());
    let left = Duration::from_secs(60) - into;
    if left < need {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
}

/// The harness's consumer `tester` with `limits` (and `per_deployment`), and `other`
/// without any.
async fn stack(limits: ConsumerLimits, per_deployment: &[(&str, ConsumerLimits)]) -> Stack {
    harness::start(|c| {
        c.consumers[0].limits = limits;
        c.consumers[0].deployment_limits = per_deployment
            .iter()
            .map(|(d, l)| ((*d).to_owned(), l.clone()))
            .collect();
        c.consumers.push(ConsumerConfig {
            id: "other".into(),
            key_sha256: vec![harness::sha(OTHER_KEY)],
            ..Default::default()
        });
    })
    .await
}

async fn chat(s: &Stack, deployment: &str, key: &str, body: Value) -> reqwest::Response {
    s.http
        .post(s.chat_url(deployment))
        .header("api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn hi(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

fn header(resp: &reqwest::Response, name: &str) -> Option<u64> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_minute_limit_get_429_and_other_consumers_do_not() {
    let s = stack(
        ConsumerLimits {
            requests_per_minute: Some(5),
            ..ConsumerLimits::default()
        },
        &[],
    )
    .await;
    whole_minute_ahead(Duration::from_secs(10)).await;
    for left in (0..5).rev() {
        let resp = chat(&s, "gpt-4o", harness::KEY, hi(4)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests"),
            Some(left),
            "the stricter of AOAI's and the consumer's"
        );
        resp.text().await.unwrap();
    }
    let refused = chat(&s, "gpt-4o", harness::KEY, hi(4)).await;
    assert_eq!(refused.status(), 429);
    let retry = header(&refused, "retry-after").expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(header(&refused, "retry-after-ms").is_some());
    let id = request_id(&refused);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("5 requests per minute"), "{message}");
    // Another consumer is untouched.
    let other = chat(&s, "gpt-4o", OTHER_KEY, hi(4)).await;
    assert_eq!(other.status(), 200);
    other.text().await.unwrap();
    // The refusal is recorded, naming the limit, and never reached a backend.
    s.settle().await;
    let r = s.record(&id).await;
    assert_eq!(r.status, Some(429));
    assert!(r.backend.is_none(), "{r:?}");
    assert!(r.attempts.is_empty());
    let raw = serde_json::to_string(&s.raw(&id).await).unwrap();
    assert!(raw.contains("5 requests per minute"));
    // The report counts it as throttled, for this consumer only.
    let rows = s
        .store
        .usage(&tollgate_store::RecordQuery::default())
        .await
        .unwrap();
    let throttled = |consumer: &str| -> u64 {
        rows.iter()
            .filter(|r| r.consumer == consumer)
            .map(|r| r.throttled_requests)
            .sum()
    };
    assert_eq!((throttled("tester"), throttled("other")), (1, 0));
}

/// A burst at once admits exactly the limit: every counter is checked and taken under one
/// lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_admits_exactly_the_limit() {
    let s = stack(
        ConsumerLimits {
            requests_per_minute: Some(20),
            ..ConsumerLimits::default()
        },
        &[],
    )
    .await;
    whole_minute_ahead(Duration::from_secs(15)).await;
    let statuses = futures_util::future::join_all((0..50).map(|_| async {
        let resp = chat(&s, "gpt-4o", harness::KEY, hi(4)).await;
        let status = resp.status().as_u16();
        resp.text().await.unwrap();
        status
    }))
    .await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 30);
}

/// Tokens are reserved from the estimate (prompt + `max_tokens`) and given back at the end
/// from AOAI's usage: one after another, eight requests reserving a quarter of the minute's
/// tokens each all pass (each gives back most of its reservation: the simulator answers in at
/// most 64 tokens); held open together, three streams keep theirs and the next request finds
/// no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reserved_then_settled_with_the_real_usage() {
    let s = stack(
        ConsumerLimits {
            tokens_per_minute: Some(4_000),
            ..ConsumerLimits::default()
        },
        &[],
    )
    .await;
    whole_minute_ahead(Duration::from_secs(15)).await;
    for _ in 0..8 {
        let resp = chat(&s, "gpt-4o", harness::KEY, hi(1_000)).await;
        assert_eq!(resp.status(), 200, "the unused reservation came back");
        resp.text().await.unwrap();
    }
    // Streams held open: their reservations stand until they end.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut body = hi(1_000);
        body["stream"] = json!(true);
        let mut resp = s
            .http
            .post(s.chat_url("gpt-4o"))
            .header("api-key", harness::KEY)
            .header("x-sim-inter-token-ms", "100")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.chunk().await.unwrap().is_some());
        open.push(resp);
    }
    let fourth = chat(&s, "gpt-4o", harness::KEY, hi(1_000)).await;
    assert_eq!(fourth.status(), 429);
    let message = fourth.text().await.unwrap();
    assert!(message.contains("4000 tokens per minute"), "{message}");
    drop(open);
}

/// A day's token quota answers 403 like APIM's quota once spent, only on the deployment it
/// is set for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_quota_on_one_deployment_answers_403() {
    let s = stack(
        ConsumerLimits::default(),
        &[(
            "gpt-4o-mini",
            ConsumerLimits {
                tokens_per_day: Some(300),
                ..ConsumerLimits::default()
            },
        )],
    )
    .await;
    let mut refused = None;
    for _ in 0..20 {
        let resp = chat(&s, "gpt-4o-mini", harness::KEY, hi(50)).await;
        if resp.status() == 403 {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let refused = refused.expect("the quota ran out within 20 requests of at most ~70 tokens");
    assert!(header(&refused, "retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "QuotaExceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("300 tokens per day on gpt-4o-mini"),
        "{message}"
    );
    let elsewhere = chat(&s, "gpt-4o", harness::KEY, hi(50)).await;
    assert_eq!(elsewhere.status(), 200, "the quota is the deployment's");
}

/// An answer AOAI does not bill (an error) gives its whole reservation back: two failing
/// requests, each reserving most of the minute's tokens, one after the other, are both sent
/// (the second is not refused for the first's reservation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_gives_its_reservation_back() {
    let s = stack(
        ConsumerLimits {
            tokens_per_minute: Some(1_100),
            ..ConsumerLimits::default()
        },
        &[],
    )
    .await;
    whole_minute_ahead(Duration::from_secs(10)).await;
    for _ in 0..2 {
        let resp = s
            .post_with_fault(&s.chat_url("gpt-4o"), &hi(1_000), "500")
            .await;
        assert_eq!(
            resp.status(),
            500,
            "AOAI's failure, not the consumer's limit"
        );
        resp.text().await.unwrap();
    }
    let ok = chat(&s, "gpt-4o", harness::KEY, hi(1_000)).await;
    assert_eq!(ok.status(), 200);
}

/// Found in review: a call that bills no tokens (a file read back) was charged whatever
/// `total_tokens` its bytes held, and a spent token quota refused it. It reserves nothing, is
/// not scanned, and passes a spent quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_bill_no_tokens_are_neither_charged_nor_refused_by_token_limits() {
    let s = stack(
        ConsumerLimits {
            tokens_per_minute: Some(100_000),
            tokens_per_day: Some(4_000),
            ..ConsumerLimits::default()
        },
        &[],
    )
    .await;
    // A batch output file whose lines carry usage, as AOAI's do.
    let boundary = "limits-file";
    let content = r#"{"response":{"body":{"usage":{"total_tokens":3990}}}}"#;
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"o.jsonl\"\r\n\r\n\
         {content}\r\n--{boundary}--\r\n"
    );
    let uploaded: Value = s
        .http
        .post(format!("{}/openai/files?{}", s.base, harness::API))
        .header("api-key", harness::KEY)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file = uploaded["id"].as_str().expect("file id");
    let read = |s: &Stack| {
        s.http
            .get(format!(
                "{}/openai/files/{file}/content?{}",
                s.base,
                harness::API
            ))
            .header("api-key", harness::KEY)
            .send()
    };
    let got = read(&s).await.unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.text().await.unwrap().contains("3990"));
    let chat_ok = chat(&s, "gpt-4o", harness::KEY, hi(100)).await;
    assert_eq!(chat_ok.status(), 200, "the file's 3,990 were not charged");
    chat_ok.text().await.unwrap();
    // Spend the day's quota, then read the file again.
    let mut spent = false;
    for _ in 0..200 {
        let resp = chat(&s, "gpt-4o", harness::KEY, hi(60)).await;
        let status = resp.status();
        resp.text().await.unwrap();
        if status == 403 {
            spent = true;
            break;
        }
    }
    assert!(spent, "the day's 4,000 tokens ran out");
    assert_eq!(read(&s).await.unwrap().status(), 200, "no tokens, no quota");
}

/// A monthly cost budget: once the parser's priced records of this month reach it, the
/// consumer gets 403 `QuotaExceeded` until the month ends; another consumer is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_monthly_budget_refuses_with_403_until_the_next_month() {
    let budget = tollgate_records::Money::from_nanos(1_000);
    let s = harness::start(|c| {
        c.consumers[0].limits.cost_per_month = Some(budget);
        c.quotas.budget_refresh_ms = 50;
        c.registry.poll_ms = 50;
        c.consumers.push(ConsumerConfig {
            id: "other".into(),
            key_sha256: vec![harness::sha(OTHER_KEY)],
            ..Default::default()
        });
    })
    .await;
    let first = chat(&s, "gpt-4o", harness::KEY, hi(20)).await;
    assert_eq!(first.status(), 200, "nothing spent yet");
    let id = request_id(&first);
    first.text().await.unwrap();
    s.settle().await;
    let cost = s.record(&id).await.cost.expect("priced");
    assert!(
        cost.total > budget,
        "one request spends the budget: {cost:?}"
    );

    // The spend is read every 50 ms; the first refusal ends the wait.
    let waited = std::time::Instant::now();
    let refused = loop {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the budget was never enforced"
        );
        let resp = chat(&s, "gpt-4o", harness::KEY, hi(5)).await;
        if resp.status() == 403 {
            break resp;
        }
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
        s.settle().await;
    };
    let retry = header(&refused, "retry-after").expect("Retry-After");
    assert!(
        (1..=31 * 86_400).contains(&retry),
        "until the next month: {retry}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "QuotaExceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cost per month"),
        "{body}"
    );
    assert_eq!(chat(&s, "gpt-4o", OTHER_KEY, hi(5)).await.status(), 200);
}
